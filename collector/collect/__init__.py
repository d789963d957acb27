"""App and server-side collection: ``POST /collect`` (see routes.py for the steps).

events.py parses and validates (pure); dedupe.py makes retries count once; ratelimit.py
answers 429s; consent_token.py shapes the token an app gets from ``POST /consent``;
openapi.py describes the endpoint.
"""

from __future__ import annotations

from collector.collect.consent_token import app_consent_token
from collector.collect.openapi import OPENAPI, SCHEMAS
from collector.collect.routes import collect_routes

__all__ = ["OPENAPI", "SCHEMAS", "app_consent_token", "collect_routes"]
