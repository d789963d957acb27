"""Proof of consent for auditors: the records of one consent chain (2.1, 5.5, 9.1-9.2)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector import openapi
from collector.api import page
from collector.auth import Principal
from collector.errors import InputError, NotFound

if TYPE_CHECKING:
    from collector.app import CollectorApp

_CONSENT_ID = re.compile(r"^[A-Za-z0-9_-]{8,40}$")


def consent_routes(app: CollectorApp) -> list[Route]:
    guard = app.guard

    # Admin only and audited with its subject: a chain links a browser's decisions (5.5).
    @guard.route(
        "admin",
        action="consent.read",
        subject=lambda r: str(r.path_params["consent_id"]),
        personal=True,
    )
    async def consent_chain(request: Request, who: Principal) -> Response:
        consent_id = str(request.path_params["consent_id"])
        if not _CONSENT_ID.match(consent_id):
            raise InputError("consent_id: 8-40 letters, digits, '-' or '_'")
        records = await app.consent_records.chain(consent_id)
        if not records:
            raise NotFound(f"no consent record for {consent_id!r}")
        return JSONResponse(page(records, consent_id=consent_id))

    return [Route("/api/consent/{consent_id}", consent_chain, methods=["GET"])]


openapi.operation(
    "GET",
    "/api/consent/{consent_id}",
    summary="Every consent record linked to this consent id, oldest first (proof of consent)",
    roles=("admin",),
    tag="consent",
    parameters=[
        openapi.path_param(
            "consent_id",
            {"type": "string", "pattern": _CONSENT_ID.pattern},
            "A consent id (from the cookie, a record or a hit); earlier and later "
            "decisions of the same browser are followed through previous_id.",
        )
    ],
    response={
        "type": "object",
        "required": ["items", "count", "consent_id"],
        "properties": {
            "consent_id": {"type": "string"},
            "count": {"type": "integer"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["consent_id", "action", "statistics", "advertising"],
                    "properties": {
                        "consent_id": {"type": "string"},
                        "previous_id": {"type": "string", "nullable": True},
                        "action": {"type": "string", "enum": ["grant", "refuse", "withdraw"]},
                        "statistics": {"type": "boolean"},
                        "advertising": {"type": "boolean"},
                        "policy_version": {"type": "string"},
                        "decided_at_ms": {"type": "integer"},
                        "source": {"type": "string"},
                        "origin": {"type": "string", "nullable": True},
                        "user_agent_family": {"type": "string"},
                        "ip_hash": {"type": "string"},
                        "gpc": {"type": "boolean"},
                    },
                },
            },
        },
    },
    responses={"404": openapi.error("No consent record has this id")},
)
