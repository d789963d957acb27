"""Analyst statistics under /api/stats (issue 4): aggregates only, JSON or CSV.

Readable by every role; each call is audited like any API call (5.5) but touches no
personal data (3.4): the answers come from the rollups, with small groups suppressed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector import openapi, stats
from collector.auth import Principal
from collector.errors import InputError

if TYPE_CHECKING:
    from collector.app import CollectorApp

_CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
Handler = Callable[[stats.Query, int], Awaitable[dict[str, Any]]]


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ tab CR gets a '."""
    if isinstance(value, str) and value.startswith(_CSV_TRIGGERS):
        return "'" + value
    if value is None:
        return ""
    return value


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])
    return out.getvalue()


def table(kind: str, body: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The rows a spreadsheet wants for each kind of answer."""
    if kind == "summary":
        cols = ["from", "to", "hits", "visitors", "consent_rate", "suppressed"]
        q = body["query"]
        return cols, [[q["from"], q["to"], *(body[c] for c in cols[2:])]]
    if kind == "breakdown":
        by = body["query"]["by"]
        rows = [[i["value"], i["hits"], i["visitors"], i["share"]] for i in body["items"]]
        rows.append(["(other)", body["other"]["hits"], None, body["other"]["share"]])
        return [by, "hits", "visitors", "share"], rows
    if kind == "consent":
        cols = ["day", "granted", "refused", "absent", "invalid", "rate"]
        return cols, [[i[c] for c in cols] for i in body["items"]]
    cols = ["t", "hits", "visitors", "suppressed"]
    return cols, [[i[c] for c in cols] for i in body["items"]]


def wants_csv(request: Request) -> bool:
    fmt = request.query_params.get("format")
    if fmt is not None and fmt not in ("json", "csv"):
        raise InputError(f"format: expected json or csv, got {fmt[:20]!r}")
    if fmt:
        return fmt == "csv"
    accept = request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept


def stats_routes(app: CollectorApp) -> list[Route]:
    guard = app.guard
    storage = app.storage
    k = app.settings.stats.min_visitors
    handlers: dict[str, Handler] = {
        "summary": lambda q, k: stats.summary(storage, q, k),
        "timeseries": lambda q, k: stats.timeseries(storage, q, k),
        "breakdown": lambda q, k: stats.breakdown(storage, q, k),
        "consent": lambda q, k: stats.consent(storage, q),
    }

    def endpoint(kind: str) -> Route:
        handler = handlers[kind]

        @guard.route("analyst", "engineer", "admin", action=f"stats.{kind}")
        async def serve(request: Request, who: Principal) -> Response:
            as_csv = wants_csv(request)
            query = stats.parse_query(request.query_params)
            body = await handler(query, k)
            if as_csv:
                header, rows = table(kind, body)
                name = f"{kind}-{query.date_from}-{query.date_to}.csv"
                return Response(
                    to_csv(header, rows),
                    media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="{name}"'},
                )
            return JSONResponse(body)

        serve.__name__ = f"stats_{kind}"
        return Route(f"/api/stats/{kind}", serve, methods=["GET"])

    return [endpoint(kind) for kind in handlers]


# --- OpenAPI ------------------------------------------------------------------------------

_ROLES = ("analyst", "engineer", "admin")
_DATE = {"type": "string", "format": "date"}
_DATE_PARAM = {**_DATE, "pattern": stats.DATE_PATTERN}
_NULLABLE_INT = {"type": "integer", "nullable": True}
_NULLABLE_NUM = {"type": "number", "nullable": True}
_COMMON = [
    openapi.query(
        "from",
        _DATE_PARAM,
        "First day (UTC, inclusive); default: 29 days before `to`. The range may span at "
        f"most {stats.MAX_DAYS} days ({stats.MAX_HOUR_DAYS} with granularity=hour); "
        f"`from` after `to` is a 400. Days from {stats.MIN_DATE} to {stats.MAX_DATE}.",
    ),
    openapi.query("to", _DATE_PARAM, "Last day (UTC, inclusive); default: today."),
    *(
        openapi.query(name, {"type": "string", "minLength": 1, "maxLength": 512}, desc)
        for name, desc in (
            ("page", "Only this page path, e.g. /catalog (at most one filter)."),
            ("placement", "Only this placement / ad-block id."),
            ("country", "Only this ISO country code, or (unknown)."),
            ("device_class", "Only this device class: mobile, tablet, pc, bot, other."),
            ("source", "Only this source: web, app, server."),
        )
    ),
    openapi.query(
        "format",
        {"type": "string", "enum": ["json", "csv"]},
        "Answer as CSV (also with Accept: text/csv); cells are escaped against formulas.",
    ),
]
_QUERY_ECHO = {
    "type": "object",
    "required": ["from", "to", "granularity", "filter"],
    "properties": {
        "from": _DATE,
        "to": _DATE,
        "granularity": {"type": "string", "enum": ["hour", "day"]},
        "filter": {"type": "object", "additionalProperties": {"type": "string"}},
        "by": {"type": "string"},
        "limit": {"type": "integer"},
    },
}
_GRANULARITY = openapi.query(
    "granularity", {"type": "string", "enum": ["hour", "day"]}, "Bucket size (hour: <= 92 days)."
)

openapi.operation(
    "GET",
    "/api/stats/summary",
    summary="Totals over the range: hits, unique visitors, consent rate",
    roles=_ROLES,
    tag="stats",
    parameters=_COMMON,
    csv=True,
    response={
        "type": "object",
        "required": ["query", "k", "hits", "visitors", "consent_rate", "suppressed"],
        "properties": {
            "query": _QUERY_ECHO,
            "k": {"type": "integer"},
            "hits": _NULLABLE_INT,
            "visitors": _NULLABLE_INT,
            "consent_rate": _NULLABLE_NUM,
            "suppressed": {"type": "boolean"},
        },
    },
)
openapi.operation(
    "GET",
    "/api/stats/timeseries",
    summary="Hits and unique visitors per hour or day",
    roles=_ROLES,
    tag="stats",
    parameters=[*_COMMON, _GRANULARITY],
    csv=True,
    response={
        "type": "object",
        "required": ["query", "k", "items", "count"],
        "properties": {
            "query": _QUERY_ECHO,
            "k": {"type": "integer"},
            "count": {"type": "integer"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["t", "hits", "visitors", "suppressed"],
                    "properties": {
                        "t": {"type": "string"},
                        "hits": _NULLABLE_INT,
                        "visitors": _NULLABLE_INT,
                        "suppressed": {"type": "boolean"},
                    },
                },
            },
        },
    },
)
openapi.operation(
    "GET",
    "/api/stats/breakdown",
    summary="Top values of one dimension; groups under k visitors merged into other",
    roles=_ROLES,
    tag="stats",
    parameters=[
        *_COMMON,
        openapi.query(
            "by", {"type": "string", "enum": list(stats.DIMENSIONS)}, "Dimension (default page)."
        ),
        openapi.query(
            "limit", {"type": "integer", "minimum": 1, "maximum": stats.MAX_LIMIT}, "Top N."
        ),
    ],
    csv=True,
    response={
        "type": "object",
        "required": ["query", "k", "total", "items", "count", "other", "suppressed_groups"],
        "properties": {
            "query": _QUERY_ECHO,
            "k": {"type": "integer"},
            "total": {"type": "integer"},
            "count": {"type": "integer"},
            "suppressed_groups": {"type": "integer"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["value", "hits", "visitors", "share"],
                    "properties": {
                        "value": {"type": "string"},
                        "hits": {"type": "integer"},
                        "visitors": _NULLABLE_INT,
                        "share": _NULLABLE_NUM,
                    },
                },
            },
            "other": {
                "type": "object",
                "required": ["hits", "share"],
                "properties": {"hits": {"type": "integer"}, "share": _NULLABLE_NUM},
            },
        },
    },
)
_CONSENT_COUNTS = {
    "granted": {"type": "integer"},
    "refused": {"type": "integer"},
    "absent": {"type": "integer"},
    "invalid": {"type": "integer"},
    "rate": _NULLABLE_NUM,
}
openapi.operation(
    "GET",
    "/api/stats/consent",
    summary="Consent rate per day from the anonymous pixel counters",
    roles=_ROLES,
    tag="stats",
    parameters=_COMMON,
    csv=True,
    response={
        "type": "object",
        "required": ["query", "total", "items", "count"],
        "properties": {
            "query": _QUERY_ECHO,
            "count": {"type": "integer"},
            "total": {"type": "object", "properties": _CONSENT_COUNTS},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"day": _DATE, **_CONSENT_COUNTS},
                },
            },
        },
    },
)
