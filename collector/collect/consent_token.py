"""The body ``POST /consent`` returns to an app (``{"client": "app", ...}``).

An app has no cookie jar shared with the collector, so it receives the very value the
``kdv_consent`` cookie would hold and sends it back in ``X-Consent`` with every batch.
Same format, same secret, same expiry (5.1) and policy version (9.1-9.2).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from collector.consent import Consent, ConsentCodec


def app_consent_token(codec: ConsentCodec, consent: Consent) -> dict[str, Any]:
    expires = consent.issued_at + codec.period_s
    return {
        "token": codec.encode(consent),
        "header": "X-Consent",
        "statistics": consent.statistics,
        "advertising": consent.advertising,
        "policy_version": consent.policy_version,
        "consent_id": consent.consent_id,
        "expires_at": datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z"),
        "expires_in": codec.remaining_s(consent, time.time()),
    }
