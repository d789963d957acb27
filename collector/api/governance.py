"""Admin routes for personal-data governance: blocks, subject requests, breach report,
retention. Admin only (5.5 access rules); every call is audited with its subject."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector import blocking, incident, openapi, retention, subjects
from collector.api import page
from collector.auth import Principal
from collector.errors import InputError, NotFound
from collector.subjects import Subject

if TYPE_CHECKING:
    from collector.app import CollectorApp

MAX_ID = 2**63 - 1  # ids are 64-bit in both backends; larger cannot name a row


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("body: expected a JSON object") from None
    if not isinstance(body, dict):
        raise InputError("body: expected a JSON object")
    return body


def _subject(request: Request, source: dict[str, Any]) -> Subject:
    visitor, ip = source.get("visitor"), source.get("ip")
    if not isinstance(visitor, str | None) or not isinstance(ip, str | None):
        raise InputError("visitor, ip: expected strings")
    found = Subject.parse(visitor, ip)
    request.state.audit_subject = found.value
    request.state.audit_detail = {"kind": found.kind}
    return found


def governance_routes(app: CollectorApp) -> list[Route]:
    guard = app.guard
    gov = app.governance

    @guard.route("admin", action="block.list")
    async def list_blocks(request: Request, who: Principal) -> Response:
        everything = request.query_params.get("all") in ("1", "true")
        return JSONResponse(page(await blocking.listing(app.storage, active_only=not everything)))

    @guard.route("admin", action="block.add", personal=True)
    async def add_block(request: Request, who: Principal) -> Response:
        body = await _body(request)
        subject = _subject(request, body)
        reason = body.get("reason")
        if not isinstance(reason, str):
            raise InputError("reason: required, say why the data is blocked")
        since = int(time.time() * 1000)
        row = await blocking.add(app.storage, subject, reason, who.name, gov.rebuilders)
        await gov.blocklist.refresh()  # this process stops recording at once
        gov.settle_later(subject, since)
        return JSONResponse(row, status_code=201)

    @guard.route("admin", action="block.release", personal=True)
    async def release_block(request: Request, who: Principal) -> Response:
        try:
            block_id = int(request.path_params["block_id"])
        except ValueError:
            raise InputError("block id: expected an integer") from None
        if not 1 <= block_id <= MAX_ID:
            raise NotFound(f"no active block with id {block_id}")
        row = await blocking.release(app.storage, block_id, who.name, gov.rebuilders)
        request.state.audit_subject = row["value"]
        request.state.audit_detail = {"kind": row["kind"], "block_id": block_id}
        await gov.blocklist.refresh()
        return JSONResponse(row)

    @guard.route("admin", action="subject.export", personal=True)
    async def export(request: Request, who: Principal) -> Response:
        subject = _subject(request, dict(request.query_params))
        data = await subjects.export(app.storage, subject, app.consent_records.ip_hash)
        request.state.audit_detail["hits"] = len(data["hits"])
        return JSONResponse(data)

    @guard.route("admin", action="subject.erase", personal=True)
    async def erase(request: Request, who: Principal) -> Response:
        subject = _subject(request, await _body(request))
        done = await subjects.erase(
            app.storage,
            subject,
            app.settings.consent.secret,
            gov.rebuilders,
            app.consent_records.ip_hash,
        )
        request.state.audit_detail.update(done.as_dict())
        return JSONResponse({"subject": subject.as_dict(), **done.as_dict()})

    @guard.route("admin", action="incident.report", personal=True)
    async def report(request: Request, who: Principal) -> Response:
        q = request.query_params
        if not q.get("from") or not q.get("to"):
            raise InputError("from, to: both required (ISO date or date-time)")
        found = await incident.affected(
            app.storage,
            incident.parse_time(q["from"], "from"),
            incident.parse_time(q["to"], "to"),
            incident.parse_network(q.get("ip_range")),
        )
        request.state.audit_detail = {
            "from": q["from"],
            "to": q["to"],
            "ip_range": found["ip_range"],
            "visitors": found["visitors"],
        }
        return JSONResponse(found)

    @guard.route("admin", action="retention.plan")
    async def retention_plan(request: Request, who: Principal) -> Response:
        plan = await retention.plan(app.storage, app.settings)
        return JSONResponse(plan.as_dict())

    @guard.route("admin", action="retention.run.request")
    async def retention_run(request: Request, who: Principal) -> Response:
        return JSONResponse({"rows": await gov.apply_retention()})

    return [
        Route("/api/admin/blocks", list_blocks, methods=["GET"]),
        Route("/api/admin/blocks", add_block, methods=["POST"]),
        Route("/api/admin/blocks/{block_id}", release_block, methods=["DELETE"]),
        Route("/api/admin/subjects", export, methods=["GET"]),
        Route("/api/admin/subjects/erase", erase, methods=["POST"]),
        Route("/api/admin/incident", report, methods=["GET"]),
        Route("/api/admin/retention", retention_plan, methods=["GET"]),
        Route("/api/admin/retention/run", retention_run, methods=["POST"]),
    ]


# --- OpenAPI ------------------------------------------------------------------------------

_ADMIN = ("admin",)
_INT = {"type": "integer"}
_NINT = {"type": "integer", "nullable": True}
_STR = {"type": "string"}
_NSTR = {"type": "string", "nullable": True}
_ROWS = {"type": "array", "items": {"type": "object"}}
_SPAN = {
    "type": "array",
    "nullable": True,
    "items": _INT,
    "minItems": 2,
    "maxItems": 2,
    "description": "[first, last + 1) unix ms of the subject's hits; null without hits",
}
_VISITOR = {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,128}$"}
_IP = {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}
_IPV4_NET = (
    r"^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(/(3[0-2]|[12]?\d))?$"
)
_SUBJECT = {
    "type": "object",
    "required": ["kind", "value"],
    "properties": {"kind": {"type": "string", "enum": ["visitor", "ip"]}, "value": _STR},
}
_BLOCK: dict[str, Any] = {
    "type": "object",
    "required": ["id", "kind", "value", "reason", "created_at", "created_by"],
    "properties": {
        "id": _INT,
        "kind": {"type": "string", "enum": ["visitor", "ip"]},
        "value": _STR,
        "reason": _STR,
        "created_at": _INT,
        "created_by": _STR,
        "released_at": _NINT,
        "released_by": _NSTR,
    },
}


def _subject_body(**extra: dict[str, Any]) -> dict[str, Any]:
    """A JSON body naming exactly one subject: a visitor id or an IP address."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"visitor": _VISITOR, "ip": _IP, **extra},
        # Both present match both branches, which oneOf refuses: exactly one.
        "oneOf": [{"required": ["visitor"]}, {"required": ["ip"]}],
    }
    if extra:
        schema["required"] = list(extra)
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_BLOCK_ID = openapi.path_param(
    "block_id", {"type": "integer", "minimum": 1, "maximum": MAX_ID}, "The block's id."
)
openapi.operation(
    "GET",
    "/api/admin/blocks",
    summary="Blocks (6.2.4), newest first; only the active ones unless all=true",
    roles=_ADMIN,
    tag="governance",
    parameters=[
        openapi.query(
            "all", {"type": "string", "enum": ["true", "false", "1", "0"]}, "Released ones too."
        )
    ],
    response={
        "type": "object",
        "required": ["items", "count"],
        "properties": {"items": {"type": "array", "items": _BLOCK}, "count": _INT},
    },
)
openapi.operation(
    "POST",
    "/api/admin/blocks",
    summary="Block a visitor or IP: recording stops and its data leaves every aggregate",
    roles=_ADMIN,
    tag="governance",
    request_body=_subject_body(
        reason={"type": "string", "pattern": r"\S", "description": "Why (request, check)"}
    ),
    responses={
        "201": {
            "description": "Blocked",
            "content": {
                "application/json": {
                    "schema": {
                        **_BLOCK,
                        "properties": {**_BLOCK["properties"], "span_ms": _SPAN},
                    }
                }
            },
        },
        "409": openapi.error("The subject is blocked already"),
    },
)
openapi.operation(
    "DELETE",
    "/api/admin/blocks/{block_id}",
    summary="Release a block: the subject's data counts and is recorded again",
    roles=_ADMIN,
    tag="governance",
    parameters=[_BLOCK_ID],
    response=_BLOCK,
    responses={"404": openapi.error("No active block has this id")},
)
openapi.operation(
    "GET",
    "/api/admin/subjects",
    summary="Export everything held about one visitor id or IP address (subject access)",
    roles=_ADMIN,
    tag="governance",
    description="Give exactly one of visitor and ip (a 400 otherwise).",
    parameters=[
        openapi.query("visitor", _VISITOR, "A visitor id (the kdv_vid cookie)."),
        openapi.query("ip", _IP, "An IP address."),
    ],
    response={
        "type": "object",
        "required": ["subject", "generated_at_ms", "hits", "blocks", "consent_records", "audit"],
        "properties": {
            "subject": _SUBJECT,
            "generated_at_ms": _INT,
            "hits": _ROWS,
            "blocks": {"type": "array", "items": _BLOCK},
            "consent_records": _ROWS,
            "audit": _ROWS,
        },
        "additionalProperties": {
            **_ROWS,
            "description": "Rows of the other personal tables (ipstat_*), by table",
        },
    },
)
openapi.operation(
    "POST",
    "/api/admin/subjects/erase",
    summary="Erase one subject: hits deleted, consent records pseudonymised, rollups rebuilt",
    roles=_ADMIN,
    tag="governance",
    request_body=_subject_body(),
    response={
        "type": "object",
        "required": [
            "subject",
            "hits",
            "consent_records_kept",
            "consent_records_pseudonymised",
            "tables",
            "span_ms",
        ],
        "properties": {
            "subject": _SUBJECT,
            "hits": _INT,
            "consent_records_kept": _INT,
            "consent_records_pseudonymised": _INT,
            "tables": {"type": "object", "additionalProperties": _INT},
            "span_ms": _SPAN,
        },
    },
)
_WHEN = {"type": "string", "anyOf": [{"format": "date"}, {"format": "date-time"}]}
openapi.operation(
    "GET",
    "/api/admin/incident",
    summary="Breach report (5.4, 5.6): the subjects with hits in a time window",
    roles=_ADMIN,
    tag="governance",
    description="`to` must be after `from` (a 400 otherwise).",
    parameters=[
        openapi.query("from", _WHEN, "Start (inclusive), UTC unless offset.", required=True),
        openapi.query("to", _WHEN, "End (exclusive), UTC unless offset.", required=True),
        openapi.query(
            "ip_range",
            {"type": "string", "anyOf": [{"pattern": _IPV4_NET}, {"format": "ipv6"}]},
            "Only IPs in this network (CIDR or one address).",
        ),
    ],
    response={
        "type": "object",
        "required": [
            "from_ms",
            "to_ms",
            "ip_range",
            "subjects",
            "visitors",
            "consent_ids",
            "hits",
        ],
        "properties": {
            "from_ms": _INT,
            "to_ms": _INT,
            "ip_range": _NSTR,
            "visitors": _INT,
            "hits": _INT,
            "consent_ids": {"type": "array", "items": _STR},
            "subjects": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["visitor_id", "consent_ids", "ips", "hits"],
                    "properties": {
                        "visitor_id": _STR,
                        "consent_ids": {"type": "array", "items": _STR},
                        "ips": {"type": "array", "items": _STR},
                        "hits": _INT,
                        "first_ms": _INT,
                        "last_ms": _INT,
                    },
                },
            },
        },
    },
)
openapi.operation(
    "GET",
    "/api/admin/retention",
    summary="What a retention run (5.1) would do now: cutoff, mode, hits pending",
    roles=_ADMIN,
    tag="governance",
    response={
        "type": "object",
        "required": ["cutoff_ms", "days", "mode", "pending"],
        "properties": {
            "cutoff_ms": _INT,
            "days": _INT,
            "mode": {"type": "string", "enum": ["delete", "depersonalise"]},
            "pending": _INT,
        },
    },
)
openapi.operation(
    "POST",
    "/api/admin/retention/run",
    summary="Apply retention (5.1) now; the rows deleted or depersonalised",
    roles=_ADMIN,
    tag="governance",
    response={"type": "object", "required": ["rows"], "properties": {"rows": _INT}},
)
