"""Admin routes for personal-data governance: blocks, subject requests, breach report,
retention. Admin only (5.5 access rules); every call is audited with its subject."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector import blocking, incident, retention, subjects
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
