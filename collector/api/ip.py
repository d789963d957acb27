"""Engineer routes for IP statistics (3.3.2 fraud control, 4.1.4, 4.1.9 support).

Engineer and admin tokens only (an analyst gets 403); every call is audited with the IP
looked up as its subject (5.5). Shapes (the dashboard builds against them):

``GET /api/ip/{ip}[?date=YYYY-MM-DD&days=30&cursor=&limit=50&format=csv]``::

    {"ip", "network", "date", "geo": {"country", "region", "city", "asn", "as_org",
     "is_anonymous", "is_anonymous_vpn", "is_hosting_provider", "is_public_proxy",
     "is_residential_proxy", "is_tor_exit_node"},
     "score", "signals": [{"rule", "explanation", "value", "threshold"}], "crawler",
     "days": [{"date", "hits", "visitors", "user_agents", "first_seen", "last_seen",
               "peak_per_minute", "countries", "bot_hits", "no_page_hits", "score",
               "rules", "unconsented": null | {"hits", "bot_hits", "crawler_hits",
               "peak_per_minute"}}],
     "hits": {"items": [{"ts", "ts_ms", "visitor_id", ...}], "next_cursor"}}

``GET /api/ip?date=YYYY-MM-DD&sort=score|hits|visitors&limit=50&kind=ip|network
&min_score=0[&format=csv]``::

    {"date", "kind", "items": [{"ip", "network", "score", "rules", "hits", "visitors",
     "country", "asn", "as_org", "crawler"}], "count"}

``format=csv`` exports the day rows of one IP, or the items of the list.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector import ipreport, openapi
from collector.api import int_param
from collector.auth import Principal
from collector.enrich import normalize_ip
from collector.errors import InputError

if TYPE_CHECKING:
    from collector.app import CollectorApp

DAY_COLUMNS = (
    "date",
    "hits",
    "visitors",
    "user_agents",
    "first_seen",
    "last_seen",
    "peak_per_minute",
    "countries",
    "bot_hits",
    "no_page_hits",
    "score",
    "rules",
)
TOP_COLUMNS = (
    "ip",
    "network",
    "score",
    "rules",
    "hits",
    "visitors",
    "country",
    "asn",
    "as_org",
    "crawler",
)


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(
            [
                " ".join(v) if isinstance(v, list) else ("" if v is None else v)
                for v in (row.get(c) for c in columns)
            ]
        )
    return out.getvalue()


def _csv_response(text: str, name: str) -> Response:
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{name}.csv"'},
    )


def _format(request: Request) -> str:
    fmt = request.query_params.get("format") or "json"
    if fmt not in ("json", "csv"):
        raise InputError(f"format: must be json or csv, got {fmt[:20]!r}")
    return fmt


def _subject(request: Request) -> str:
    raw = str(request.path_params["ip"])
    return normalize_ip(raw) or raw


def ip_routes(app: CollectorApp) -> list[Route]:
    guard = app.guard
    fraud = app.settings.fraud

    @guard.route("engineer", "admin", action="ip.lookup", subject=_subject, personal=True)
    async def ip_lookup(request: Request, who: Principal) -> Response:
        fmt = _format(request)
        report = await ipreport.lookup(
            app.storage,
            app.geoip,
            fraud,
            str(request.path_params["ip"]),
            date=ipreport.parse_date(request.query_params.get("date")),
            days=int_param(request, "days", 30, 1, 400),
            cursor=request.query_params.get("cursor") or None,
            limit=int_param(request, "limit", 50, 1, 500),
            include_blocked=who.role == "admin",  # 6.2.4: blocked data for admins only
        )
        if fmt == "csv":
            return _csv_response(to_csv(report["days"], DAY_COLUMNS), f"ip-{report['ip']}")
        return JSONResponse(report)

    def _top_subject(request: Request) -> str:
        kind = request.query_params.get("kind") or "ip"
        return f"top:{kind}:{request.query_params.get('date') or ipreport.today()}"

    @guard.route("engineer", "admin", action="ip.top", subject=_top_subject, personal=True)
    async def ip_top(request: Request, who: Principal) -> Response:
        fmt = _format(request)
        kind = request.query_params.get("kind") or "ip"
        if kind not in ("ip", "network"):
            raise InputError(f"kind: must be ip or network, got {kind[:20]!r}")
        result = await ipreport.top(
            app.storage,
            app.geoip,
            fraud,
            date=ipreport.parse_date(request.query_params.get("date")),
            kind="ip" if kind == "ip" else "network",
            sort=request.query_params.get("sort") or "score",
            limit=int_param(request, "limit", 50, 1, 1000),
            min_score=int_param(request, "min_score", 0, 0, 100),
        )
        if fmt == "csv":
            return _csv_response(to_csv(result["items"], TOP_COLUMNS), f"ip-top-{result['date']}")
        return JSONResponse(result)

    return [
        Route("/api/ip", ip_top, methods=["GET"]),
        Route("/api/ip/{ip:path}", ip_lookup, methods=["GET"]),
    ]


# --- OpenAPI ------------------------------------------------------------------------------

_ROLES = ("engineer", "admin")
_STR = {"type": "string"}
_NSTR = {"type": "string", "nullable": True}
_INT = {"type": "integer"}
_NINT = {"type": "integer", "nullable": True}
_RULES = {"type": "array", "items": _STR}
_IP = {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}
_DATE = openapi.query(
    "date", {"type": "string", "format": "date"}, "The day (UTC); default: the latest day seen."
)
_FORMAT = openapi.query(
    "format", {"type": "string", "enum": ["json", "csv"]}, "csv: the rows as a spreadsheet."
)
_GEO = {
    "type": "object",
    "properties": {
        "country": _NSTR,
        "region": _NSTR,
        "city": _NSTR,
        "asn": _NINT,
        "as_org": _NSTR,
        **{
            flag: {"type": "boolean"}
            for flag in (
                "is_anonymous",
                "is_anonymous_vpn",
                "is_hosting_provider",
                "is_public_proxy",
                "is_residential_proxy",
                "is_tor_exit_node",
            )
        },
    },
}
_DAY = {
    "type": "object",
    "required": list(DAY_COLUMNS),
    "properties": {
        "date": {"type": "string", "format": "date"},
        "hits": _INT,
        "visitors": _INT,
        "user_agents": _INT,
        "first_seen": _NSTR,
        "last_seen": _NSTR,
        "peak_per_minute": _INT,
        "countries": {"type": "array", "items": _STR},
        "bot_hits": _INT,
        "no_page_hits": _INT,
        "score": _INT,
        "rules": _RULES,
        "unconsented": {
            "type": "object",
            "nullable": True,
            "description": "Hits without statistics consent, counted without a visitor id",
            "properties": {
                "hits": _INT,
                "bot_hits": _INT,
                "crawler_hits": _INT,
                "peak_per_minute": _INT,
            },
        },
    },
}
openapi.operation(
    "GET",
    "/api/ip/{ip}",
    summary="One IP: geo, fraud score and signals, per-day figures, its raw hits",
    roles=_ROLES,
    tag="ip",
    description="Raw hits of blocked subjects (6.2.4) are shown to admins only, marked.",
    parameters=[
        openapi.path_param("ip", _IP, "IPv4 or IPv6 address."),
        _DATE,
        openapi.query("days", {"type": "integer", "minimum": 1, "maximum": 400}, "Days back (30)."),
        openapi.query(
            "cursor",
            {"type": "string", "pattern": ipreport.CURSOR.pattern},
            "next_cursor of the previous page of hits.",
        ),
        openapi.query(
            "limit", {"type": "integer", "minimum": 1, "maximum": 500}, "Hits per page (50)."
        ),
        _FORMAT,
    ],
    csv=True,
    response={
        "type": "object",
        "required": ["ip", "network", "date", "geo", "score", "signals", "crawler", "days", "hits"],
        "properties": {
            "ip": _STR,
            "network": _STR,
            "date": {"type": "string", "format": "date"},
            "geo": _GEO,
            "score": _INT,
            "signals": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["rule", "explanation"],
                    "properties": {
                        "rule": _STR,
                        "explanation": _STR,
                        "value": {},
                        "threshold": {},
                    },
                },
            },
            "crawler": _NSTR,
            "days": {"type": "array", "items": _DAY},
            "hits": {
                "type": "object",
                "required": ["items", "next_cursor"],
                "properties": {
                    "next_cursor": _NSTR,
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["ts", "ts_ms"],
                            "properties": {
                                "ts": _STR,
                                "ts_ms": _INT,
                                "visitor_id": _STR,
                                "blocked": {"type": "boolean", "description": "admins only"},
                            },
                        },
                    },
                },
            },
        },
    },
)
openapi.operation(
    "GET",
    "/api/ip",
    summary="The most suspicious IPs or networks of one day",
    roles=_ROLES,
    tag="ip",
    parameters=[
        _DATE,
        openapi.query(
            "sort", {"type": "string", "enum": ["score", "hits", "visitors"]}, "Order (score)."
        ),
        openapi.query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "At most."),
        openapi.query("kind", {"type": "string", "enum": ["ip", "network"]}, "Per IP or /24."),
        openapi.query(
            "min_score", {"type": "integer", "minimum": 0, "maximum": 100}, "Leave out below."
        ),
        _FORMAT,
    ],
    csv=True,
    response={
        "type": "object",
        "required": ["date", "kind", "items", "count"],
        "properties": {
            "date": {"type": "string", "format": "date"},
            "kind": {"type": "string", "enum": ["ip", "network"]},
            "count": _INT,
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": list(TOP_COLUMNS),
                    "properties": {
                        "ip": _NSTR,
                        "network": _STR,
                        "score": _INT,
                        "rules": _RULES,
                        "hits": _INT,
                        "visitors": _INT,
                        "country": _NSTR,
                        "asn": _NINT,
                        "as_org": _NSTR,
                        "crawler": _NSTR,
                    },
                },
            },
        },
    },
)
