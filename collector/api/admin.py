"""Admin and identity routes: who am I, and the audit trail (5.5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector import openapi
from collector.api import int_param, page
from collector.auth import Principal

if TYPE_CHECKING:
    from collector.app import CollectorApp


def admin_routes(app: CollectorApp) -> list[Route]:
    guard = app.guard

    @guard.route("analyst", "engineer", "admin", action="whoami")
    async def whoami(request: Request, who: Principal) -> Response:
        return JSONResponse({"name": who.name, "role": who.role})

    @guard.route("admin", action="audit.read")
    async def audit_list(request: Request, who: Principal) -> Response:
        entries = await app.audit.entries(
            limit=int_param(request, "limit", 100, 1, 1000),
            before_id=int_param(request, "before_id", 2**62, 1, 2**62),
            action=request.query_params.get("action") or None,
            subject=request.query_params.get("subject") or None,
        )
        return JSONResponse(page(entries))

    @guard.route("admin", action="audit.verify")
    async def audit_verify(request: Request, who: Principal) -> Response:
        result = await app.audit.verify()
        return JSONResponse(
            {
                "ok": result.ok,
                "checked": result.checked,
                "bad_id": result.bad_id,
                "reason": result.reason,
            },
            status_code=200,
        )

    return [
        Route("/api/whoami", whoami, methods=["GET"]),
        Route("/api/audit", audit_list, methods=["GET"]),
        Route("/api/audit/verify", audit_verify, methods=["GET"]),
    ]


_ADMIN = ("admin",)
_AUDIT_ENTRY = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "ts_ms": {"type": "integer"},
        "actor": {"type": "string"},
        "role": {"type": "string", "nullable": True},
        "action": {"type": "string"},
        "subject": {"type": "string", "nullable": True},
        "request_id": {"type": "string", "nullable": True},
        "outcome": {"type": "string"},
        "detail": {"nullable": True},
    },
}
openapi.operation(
    "GET",
    "/api/whoami",
    summary="The name and role of the calling token",
    roles=("analyst", "engineer", "admin"),
    tag="admin",
    response={
        "type": "object",
        "required": ["name", "role"],
        "properties": {
            "name": {"type": "string"},
            "role": {"type": "string", "enum": ["analyst", "engineer", "admin"]},
        },
    },
)
openapi.operation(
    "GET",
    "/api/audit",
    summary="Audit trail entries, newest first (5.5)",
    roles=_ADMIN,
    tag="admin",
    parameters=[
        openapi.query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "At most."),
        openapi.query(
            "before_id", {"type": "integer", "minimum": 1, "maximum": 2**62}, "Page: ids below."
        ),
        openapi.query("action", {"type": "string"}, "Only this action, e.g. stats.summary."),
        openapi.query("subject", {"type": "string"}, "Only entries about this subject."),
    ],
    response={
        "type": "object",
        "required": ["items", "count"],
        "properties": {
            "items": {"type": "array", "items": _AUDIT_ENTRY},
            "count": {"type": "integer"},
        },
    },
)
openapi.operation(
    "GET",
    "/api/audit/verify",
    summary="Check the audit trail's hash chain",
    roles=_ADMIN,
    tag="admin",
    response={
        "type": "object",
        "required": ["ok", "checked", "bad_id", "reason"],
        "properties": {
            "ok": {"type": "boolean"},
            "checked": {"type": "integer"},
            "bad_id": {"type": "integer", "nullable": True},
            "reason": {"type": "string", "nullable": True},
        },
    },
)
