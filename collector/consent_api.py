"""``/consent``: read, give, change and withdraw this browser's consent (2.1, 4.1.10-4.1.11).

``GET`` answers the decision in force; ``POST`` takes one (JSON or a form; a missing
purpose is a refusal); ``DELETE`` withdraws everything. Each change is first stored as a
consent record (no proof, no consent: a failed write sets no cookie), then the signed
``kdv_consent`` cookie is replaced, and without statistics the visitor and session cookies
expire at once.

The store's pages call this cross-origin with credentials, so CORS answers only the
origins in ``consent.allowed_origins``, and only those origins (or the collector's own
pages) may change consent: a POST or DELETE whose Origin (else Referer) is anything else
is refused -- otherwise any site could decide for the visitor (CSRF).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector import openapi
from collector.collect.consent_token import app_consent_token
from collector.config import Settings
from collector.consent import (
    ADVERTISING,
    STATISTICS,
    Consent,
    ConsentCodec,
    ConsentReader,
    cookie_attributes,
    expiring_visitor_cookies,
)
from collector.consent_records import Action, ConsentRecord, ConsentRecords
from collector.enrich import make_ua_parser
from collector.errors import CollectorError
from collector.pixel import parse_cookies

MAX_BODY = 4096
_PURPOSES = ("statistics", "advertising")
_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no", ""})
_METHODS = "GET, POST, DELETE"


class BadBody(CollectorError):
    """A POST body we cannot read as a decision; names the offending field when there is one."""

    code = "bad_request"

    def __init__(self, detail: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(detail)
        self.field = field
        self.status = status


class ConsentApi:
    """The /consent endpoints; one instance per app."""

    def __init__(
        self,
        settings: Settings,
        codec: ConsentCodec,
        reader: ConsentReader,
        records: ConsentRecords,
        client_ip: Callable[[Request], str],
    ) -> None:
        self.codec = codec
        self.reader = reader
        self.records = records
        self.client_ip = client_ip
        self.source = settings.consent.source
        self.cookie_name = settings.consent.cookie_name
        self.allowed_origins = frozenset(settings.consent.allowed_origins)
        self.honor_dnt = settings.consent.honor_dnt
        self.ua = make_ua_parser(1024)
        self._attrs = cookie_attributes(settings.visitor)
        self._max_age = settings.consent.period_days * 86_400
        self._expire = expiring_visitor_cookies(settings.visitor)
        self._wanted = frozenset(reader.cookie_names) | {self.cookie_name}

    def routes(self) -> list[Route]:
        return [
            Route("/consent", self.endpoint, methods=["GET", "POST", "DELETE", "OPTIONS"]),
        ]

    async def endpoint(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        try:
            if request.method == "OPTIONS":
                response = self._preflight(request, origin)
            elif request.method in ("GET", "HEAD"):
                response = self._answer(request, time.time())
            else:
                response = await self._change(request, origin)
        except CollectorError as exc:
            body: dict[str, Any] = {"error": exc.code, "detail": exc.detail}
            if isinstance(exc, BadBody) and exc.field is not None:
                body["field"] = exc.field
            response = JSONResponse(body, status_code=exc.status)
        response.headers["cache-control"] = "no-store"
        response.headers["vary"] = "Origin, Cookie"
        if origin is not None and origin in self.allowed_origins:
            response.headers["access-control-allow-origin"] = origin
            response.headers["access-control-allow-credentials"] = "true"
        return response

    # --- reading ----------------------------------------------------------------------

    def _cookies(self, request: Request) -> dict[str, str]:
        return parse_cookies(request.headers.get("cookie", ""), self._wanted)

    def _signals(self, request: Request) -> bool:
        """Sec-GPC: 1 (and DNT: 1 when honoured) refuse advertising whatever was decided."""
        if request.headers.get("sec-gpc", "").strip() == "1":
            return True
        return self.honor_dnt and request.headers.get("dnt", "").strip() == "1"

    def _answer(self, request: Request, now: float) -> Response:
        cookies = self._cookies(request)
        gpc = self._signals(request)
        if self.source != "cookie":
            consent, _ = self.reader.read(cookies, now)
            return JSONResponse(self._state(consent, None, stale=False, gpc=gpc))
        raw = cookies.get(self.cookie_name)
        decided = self.codec.verify(raw) if raw else None
        if decided is not None and not self.codec.is_current(decided, now):
            if self.codec.is_stale(decided) and self.codec.remaining_s(decided, now) > 0:
                # 9.1-9.2: decided, but under a policy version that no longer counts.
                return JSONResponse(self._state(None, decided, stale=True, gpc=gpc))
            decided = None  # lapsed (5.1), or issued in the future: as if never asked
        return JSONResponse(self._state(decided, decided, stale=False, gpc=gpc))

    def _state(
        self, in_force: Consent | None, decided: Consent | None, *, stale: bool, gpc: bool
    ) -> dict[str, Any]:
        shown = decided or in_force
        return {
            "statistics": bool(in_force and in_force.statistics),
            "advertising": bool(in_force and in_force.advertising and not gpc),
            "policy_version": self.codec.policy_version,
            "consent_id": shown.consent_id if shown else None,
            "decided_at": _iso(decided.issued_at) if decided else None,
            "stale": stale,
            "source": self.source,
        }

    # --- changing ---------------------------------------------------------------------

    def _preflight(self, request: Request, origin: str | None) -> Response:
        if origin is None or origin not in self.allowed_origins:
            raise _Forbidden(f"origin {origin!r} is not in consent.allowed_origins")
        return Response(
            status_code=204,
            headers={
                "access-control-allow-methods": _METHODS,
                "access-control-allow-headers": "Content-Type, Accept",
                "access-control-max-age": "600",
            },
        )

    def _check_origin(self, request: Request, origin: str | None) -> str:
        """The caller's origin, if it may change consent (CSRF); else raise."""
        if origin is None:
            referer = urlsplit(request.headers.get("referer", ""))
            origin = f"{referer.scheme}://{referer.netloc}" if referer.netloc else None
        if origin is None:
            raise _Forbidden("changing consent needs an Origin header")
        if origin in self.allowed_origins:
            return origin
        # The collector's own pages (the demo, a first-party banner). The scheme is not
        # compared: behind a TLS-terminating proxy the request arrives as http.
        host = request.headers.get("host", "")
        if host and urlsplit(origin).netloc == host and origin != "null":
            return origin
        raise _Forbidden(f"origin {origin!r} may not change consent (consent.allowed_origins)")

    async def _change(self, request: Request, origin: str | None) -> Response:
        client = "web"
        if request.method == "POST":
            purposes, source, client = await _read_decision(request)
        # An app keeps its decision as a token it sends in X-Consent (no cookie is set), so
        # a cross-site POST gains nothing: only browser decisions need the origin check.
        checked = (
            (origin or "app")[:256] if client == "app" else self._check_origin(request, origin)
        )
        if self.source != "cookie":
            raise _Conflict(
                f"consent.source is {self.source!r}: the decision is made in that consent "
                "platform, not here"
            )
        action: Action = "withdraw"
        if request.method == "POST":
            action = "grant" if purposes else "refuse"
        else:
            purposes, source = 0, "delete"
        now = time.time()
        raw = self._cookies(request).get(self.cookie_name)
        previous = self.codec.verify(raw) if raw else None
        consent = self.codec.issue(purposes, now=now)
        gpc = self._signals(request)
        await self.records.append(
            ConsentRecord(
                consent_id=consent.consent_id,
                previous_id=previous.consent_id if previous else None,
                action=action,
                statistics=consent.statistics,
                advertising=consent.advertising,
                policy_version=consent.policy_version,
                decided_at_ms=int(now * 1000),
                source=source,
                origin=checked[:256],
                user_agent_family=self.ua(request.headers.get("user-agent", "")[:512]).family[:64],
                ip_hash=self.records.ip_hash(self.client_ip(request)),
                gpc=gpc,
            )
        )
        if client == "app":
            body = {**self._state(consent, consent, stale=False, gpc=gpc)}
            body.update(app_consent_token(self.codec, consent))
            return JSONResponse(body)
        response = JSONResponse(self._state(consent, consent, stale=False, gpc=gpc))
        value = self.codec.encode(consent)
        response.headers.append(
            "set-cookie", f"{self.cookie_name}={value}; Max-Age={self._max_age}{self._attrs}"
        )
        if not consent.statistics:
            # Withdrawal takes effect at once: the visitor id must not outlive the consent.
            for expire in self._expire:
                response.headers.append("set-cookie", expire)
        return response


async def _read_decision(request: Request) -> tuple[int, str, str]:
    """Purpose bits, source ("post-json" / "post-form" / "app") and client, or BadBody."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadBody(f"body larger than {MAX_BODY} bytes", status=413)
    if kind == "application/json":
        fields = _json_fields(body)
        client = str(fields.pop("client", "web"))
        return _purposes(fields), "app" if client == "app" else "post-json", client
    if kind == "application/x-www-form-urlencoded":
        return _purposes(_form_fields(body)), "post-form", "web"
    raise BadBody(
        "send application/json or application/x-www-form-urlencoded, "
        f"not {kind or 'an empty content type'!r}",
        status=415,
    )


def _json_fields(body: bytes) -> dict[str, bool | str]:
    try:
        data = json.loads(body or b"null")
    except (ValueError, RecursionError):
        raise BadBody("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadBody('body must be a JSON object like {"statistics": true}')
    for key, value in data.items():
        if key == "client":
            if value not in ("web", "app"):
                raise BadBody('client: expected "web" or "app"', "client")
            continue
        if key not in _PURPOSES:
            raise BadBody(
                f"unknown field {key[:40]!r} (known: statistics, advertising, client)", key[:40]
            )
        if not isinstance(value, bool):
            raise BadBody(f"{key}: expected true or false, got {json.dumps(value)[:40]}", key)
    return data


def _form_fields(body: bytes) -> dict[str, bool]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise BadBody("body is not a valid urlencoded form") from None
    fields: dict[str, bool] = {}
    for key, value in pairs:
        if key not in _PURPOSES:
            raise BadBody(f"unknown field {key[:40]!r} (known: statistics, advertising)", key[:40])
        if key in fields:
            raise BadBody(f"{key}: given more than once", key)
        lowered = value.strip().lower()
        if lowered not in _TRUE and lowered not in _FALSE:
            raise BadBody(f"{key}: expected 1 or 0, got {value[:40]!r}", key)
        fields[key] = lowered in _TRUE
    return fields


def _purposes(fields: Mapping[str, bool | str]) -> int:
    # A missing purpose is a refusal: consent is never implied (4.1.10, 4.1.11).
    bits = STATISTICS if fields.get("statistics") else 0
    return bits | (ADVERTISING if fields.get("advertising") else 0)


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class _Forbidden(CollectorError):
    status = 403
    code = "forbidden"


class _Conflict(CollectorError):
    status = 409
    code = "consent_managed_externally"


# --- OpenAPI ------------------------------------------------------------------------------

_STATE: dict[str, Any] = {
    "type": "object",
    "required": [
        "statistics",
        "advertising",
        "policy_version",
        "consent_id",
        "decided_at",
        "stale",
        "source",
    ],
    "properties": {
        "statistics": {"type": "boolean"},
        "advertising": {
            "type": "boolean",
            "description": "false under Sec-GPC: 1 (DNT: 1 when honoured), whatever was decided",
        },
        "policy_version": {"type": "string"},
        "consent_id": {"type": "string", "nullable": True},
        "decided_at": {"type": "string", "format": "date-time", "nullable": True},
        "stale": {
            "type": "boolean",
            "description": "Decided under a policy version that no longer counts: ask again",
        },
        "source": {"type": "string", "enum": ["cookie", "cookieconsent", "tcf", "plain"]},
    },
}
_APP_STATE = {
    **_STATE,
    "properties": {
        **_STATE["properties"],
        "token": {"type": "string", "description": "Send back in X-Consent with /collect"},
        "header": {"type": "string", "enum": ["X-Consent"]},
        "expires_at": {"type": "string", "format": "date-time"},
        "expires_in": {"type": "integer"},
    },
}
_FLAG = {"type": "string", "enum": sorted(_TRUE | _FALSE)}
_BAD_BODY = {
    "description": "A decision this endpoint cannot read; `field` names the culprit",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {
                    "error": {"type": "string"},
                    "detail": {"type": "string"},
                    "field": {"type": "string"},
                },
            }
        }
    },
}


_CHANGE_ERRORS = {
    "403": openapi.error(
        "Origin (else Referer) missing or not allowed to change consent (CSRF); "
        'apps ({"client": "app"}) are exempt'
    ),
    "409": openapi.error("consent.source is an external platform: decide there, not here"),
    "503": openapi.error("The consent record could not be stored: nothing was changed"),
}
openapi.operation(
    "GET",
    "/consent",
    summary="The consent in force for this browser (kdv_consent cookie)",
    tag="consent",
    response=_STATE,
)
openapi.operation(
    "POST",
    "/consent",
    summary="Give, refuse or change consent; a missing purpose is a refusal",
    tag="consent",
    description=(
        "Stores a consent record, then replaces the kdv_consent cookie (Set-Cookie); without "
        "statistics the visitor and session cookies expire at once. With "
        '`"client": "app"` no cookie is set: the answer carries the token for X-Consent.'
    ),
    request_body={
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "statistics": {"type": "boolean"},
                        "advertising": {"type": "boolean"},
                        "client": {"type": "string", "enum": ["web", "app"], "default": "web"},
                    },
                }
            },
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"statistics": _FLAG, "advertising": _FLAG},
                }
            },
        },
    },
    response=_APP_STATE,
    responses={
        "400": _BAD_BODY,
        **_CHANGE_ERRORS,
        "413": openapi.error(f"Body larger than {MAX_BODY} bytes"),
        "415": openapi.error("Content-Type is neither JSON nor a urlencoded form"),
    },
)
openapi.operation(
    "DELETE",
    "/consent",
    summary="Withdraw consent: statistics and advertising refused from now on",
    tag="consent",
    response=_STATE,
    responses=_CHANGE_ERRORS,
)
