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


def _target(request: Request, body: dict[str, Any]) -> blocking.Target:
    named = {k: body.get(k) for k in ("visitor", "ip", "network")}
    if not all(isinstance(v, str | None) for v in named.values()):
        raise InputError("visitor, ip, network: expected strings")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise InputError("force: expected true or false")
    found = blocking.Target.parse(**named, force=force)
    request.state.audit_subject = found.value
    detail: dict[str, Any] = {"kind": found.kind}
    if force:
        detail["force"] = True  # a network wider than the limit, on purpose
    request.state.audit_detail = detail
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
        target = _target(request, body)
        reason = body.get("reason")
        if not isinstance(reason, str):
            raise InputError("reason: required, say why the data is blocked")
        ends, duration = body.get("expires_at"), body.get("for")
        if not isinstance(ends, str | int | None) or not isinstance(duration, str | None):
            raise InputError("expires_at, for: expected strings")
        expires_at = blocking.parse_expiry(ends, duration)
        request.state.audit_detail["expires_at"] = expires_at
        since = int(time.time() * 1000)
        row = await blocking.add(
            app.storage, target, reason, who.name, gov.rebuilders, expires_at=expires_at
        )
        await gov.blocklist.refresh()  # this process stops recording at once
        gov.settle_later(target, since, int(row["id"]))
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
        consent = await retention.consent_records_plan(app.storage, app.settings)
        return JSONResponse({**plan.as_dict(), "consent_records": consent.as_dict()})

    @guard.route("admin", action="retention.run.request")
    async def retention_run(request: Request, who: Principal) -> Response:
        rows = await gov.apply_retention()
        consent = await gov.apply_consent_retention(actor=who.name)
        return JSONResponse({"rows": rows, "consent_records": consent})

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
        "kind": {"type": "string", "enum": ["visitor", "ip", "network"]},
        "value": {
            "type": "string",
            "description": "Visitor id, canonical IP, or network in CIDR form (host bits 0)",
        },
        "reason": _STR,
        "created_at": _INT,
        "created_by": _STR,
        "released_at": {
            **_NINT,
            "description": "unix ms of the release; for an expired block, its expires_at",
        },
        "released_by": {**_NSTR, "description": "who released it; `expiry` when it ended"},
        "expires_at": {**_NINT, "description": "unix ms when the block ends; null: never"},
        "state": {
            "type": "string",
            "enum": ["active", "expired", "released"],
            "description": "In block listings and answers (not in a subject export)",
        },
    },
}
_HEX = "[0-9A-Fa-f]{1,4}"
_IPV6 = (
    rf"({_HEX}:){{7}}{_HEX}|({_HEX}:){{1,7}}:|({_HEX}:){{1,6}}:{_HEX}"
    rf"|({_HEX}:){{1,5}}(:{_HEX}){{1,2}}|({_HEX}:){{1,4}}(:{_HEX}){{1,3}}"
    rf"|({_HEX}:){{1,3}}(:{_HEX}){{1,4}}|({_HEX}:){{1,2}}(:{_HEX}){{1,5}}"
    rf"|{_HEX}:(:{_HEX}){{1,6}}|:((:{_HEX}){{1,7}}|:)"
)
_IPV6_NET = rf"^({_IPV6})(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?$"
_NETWORK = {
    "type": "string",
    "anyOf": [{"pattern": _IPV4_NET}, {"pattern": _IPV6_NET}],
    "description": "A network in CIDR form, e.g. 203.0.113.0/24 or 2001:db8::/48. Host bits "
    "are cleared; an IPv4-mapped IPv6 network becomes IPv4; a /32 or /128 is an IP block. "
    "Wider than /16 (IPv4) or /32 (IPv6) is refused (422) unless force is true.",
}
_BLOCK_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["reason"],
                "properties": {
                    "visitor": _VISITOR,
                    "ip": _IP,
                    "network": _NETWORK,
                    "reason": {
                        "type": "string",
                        "pattern": r"\S",
                        "description": "Why (request, check)",
                    },
                    "expires_at": {
                        "anyOf": [
                            {"type": "string", "format": "date-time"},
                            {"type": "integer", "minimum": 0, "maximum": MAX_ID},
                        ],
                        "description": "When the block ends by itself (ISO 8601, UTC unless "
                        "offset, or unix ms); must be in the future (422 otherwise)",
                    },
                    "for": {
                        "type": "string",
                        "pattern": r"^[1-9][0-9]{0,5}[smhdw]$",
                        "description": "Instead of expires_at: how long, e.g. 30d, 12h, 2w",
                    },
                    "force": {
                        "type": "boolean",
                        "description": "Allow a network wider than /16 (IPv4) or /32 (IPv6)",
                    },
                },
                "oneOf": [
                    {"required": ["visitor"]},
                    {"required": ["ip"]},
                    {"required": ["network"]},
                ],
                "not": {"required": ["expires_at", "for"]},
            }
        }
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
    summary="Blocks (6.2.4), newest first; only those in force unless all=true (then "
    "released and expired ones too, with their state)",
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
    summary="Block a visitor, IP or network: recording stops and its data leaves every "
    "aggregate, until released or until expires_at",
    roles=_ADMIN,
    tag="governance",
    request_body=_BLOCK_BODY,
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
        "422": openapi.error(
            "The network is wider than the limit without force, or expires_at has passed"
        ),
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
    responses={"404": openapi.error("No active block has this id (released or expired)")},
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
    summary="What a retention run (5.1) would do now: cutoff, mode, hits pending, and the "
    "same for proofs of consent (their own period)",
    roles=_ADMIN,
    tag="governance",
    response={
        "type": "object",
        "required": ["cutoff_ms", "days", "mode", "pending", "consent_records"],
        "properties": {
            "cutoff_ms": _INT,
            "days": _INT,
            "mode": {"type": "string", "enum": ["delete", "depersonalise"]},
            "pending": _INT,
            "consent_records": {
                "type": "object",
                "required": ["cutoff_ms", "days", "pending"],
                "properties": {"cutoff_ms": _INT, "days": _INT, "pending": _INT},
            },
        },
    },
)
openapi.operation(
    "POST",
    "/api/admin/retention/run",
    summary="Apply retention (5.1) now; the hits deleted or depersonalised and the consent "
    "records deleted",
    roles=_ADMIN,
    tag="governance",
    response={
        "type": "object",
        "required": ["rows", "consent_records"],
        "properties": {"rows": _INT, "consent_records": _INT},
    },
)
