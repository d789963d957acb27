"""The hot path: ``GET /p.gif`` as a raw ASGI callable.

Request facts -> consent check -> ``RawHit`` (consented) or ``AnonHit`` (everything else)
-> writer buffer -> the 43-byte GIF. No Starlette objects, no I/O, no enrichment here:
headers are read once from the scope and the response messages are pre-built, because
Starlette's Request/Response machinery alone costs ~30% of a bare pixel (see
docs/PERFORMANCE.md). Whatever arrives, the browser gets the image.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus

from collector.config import Settings
from collector.consent import (
    ConsentCodec,
    ConsentReader,
    cookie_attributes,
    expiring_visitor_cookies,
)
from collector.enrich import ClientIP
from collector.metrics import Metrics
from collector.storage.base import AnonHit, RawHit
from collector.writer import BatchWriter, Item

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Iterable[tuple[bytes, bytes]]

# The smallest transparent 1x1 GIF (43 bytes).
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_BASE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"image/gif"),
    (b"content-length", str(len(GIF)).encode()),
    (b"cache-control", b"no-store, no-cache, must-revalidate, max-age=0"),
    (b"x-content-type-options", b"nosniff"),
    # Store pages on another origin embed the image.
    (b"cross-origin-resource-policy", b"cross-origin"),
)
# The same headers as lines, for a server that writes the response itself (protocol.py).
_BASE_BLOCK = b"".join(b"%s: %s\r\n" % header for header in _BASE_HEADERS)
_COOKIE_LINES = b"%bset-cookie: %b\r\nset-cookie: %b\r\n"  # both paths set two cookies or none
_ID = re.compile(r"^[0-9a-f]{32}$")
# ``RawHit(...)`` runs namedtuple's generated ``__new__`` (a Python-level call that fills
# ten defaults): 9% of our request path. The same tuples, built directly.
_tuple = tuple.__new__
_RAW_TAIL = tuple(RawHit._field_defaults[name] for name in RawHit._fields[11:])
_ANON_TAIL = tuple(AnonHit._field_defaults[name] for name in AnonHit._fields[3:])
_MAX_PARAM = 8192
_MAX_COOKIE_HEADER = 16_384
_UA_MEMO = 4096  # distinct user agents kept (~1 MB)
_UA_MEMO_BYTES = 1024


class _IdSource:
    """Random 128-bit ids as hex, from one ``getrandom`` call per 256 ids.

    ``os.urandom`` is a system call that releases the GIL; with the writer's SQLite thread
    busy, getting the GIL back cost ~20 us per id (NOTES-PERFORMANCE.md). The bytes are the
    same kernel CSPRNG output, fetched in bulk.
    """

    __slots__ = ("_hex", "_pos")

    _BYTES = 4096

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0

    def __call__(self) -> str:
        pos = self._pos
        if pos == len(self._hex):
            self._hex = os.urandom(self._BYTES).hex()
            pos = 0
        self._pos = pos + 32
        return self._hex[pos : pos + 32]


def _unquote(value: str) -> str:
    return unquote_plus(value, errors="replace")


def _parse_query(qs: bytes) -> tuple[str, str, str]:
    u = r = e = ""
    for part in qs[: _MAX_PARAM * 3].decode("latin-1").split("&"):
        key, _, value = part.partition("=")
        if key == "u" and not u:
            u = _unquote(value[:_MAX_PARAM])
        elif key == "r" and not r:
            r = _unquote(value[:_MAX_PARAM])
        elif key == "e" and not e:
            e = _unquote(value[:512])
    return u, r, e


# Each page's tag sends the same query string for every visitor and every view: parsing
# is a pure function, so short strings (nearly all) are memoised whole, one dict lookup
# instead of a split and two or three decodes (~1 us a request). Long ones are not, so
# that hostile input cannot grow the cache past ~8192 x 2 KB.
_parse_query_short = lru_cache(maxsize=8192)(_parse_query)


def parse_pixel_query(qs: bytes) -> tuple[str, str, str]:
    """``u``, ``r``, ``e`` from the query string (first occurrence wins), '' if absent."""
    if not qs:
        return "", "", ""
    if len(qs) <= 1024:
        return _parse_query_short(qs)
    return _parse_query(qs)


def parse_cookies(header: str, wanted: frozenset[str]) -> dict[str, str]:
    """The cookies named in ``wanted`` (first occurrence wins); everything else is ignored.

    The raw Cookie header never leaves this function: it carries session and auth tokens
    that must never be stored (3.3.2 "information from cookies" means our own ones and the
    allowlist).
    """
    found: dict[str, str] = {}
    for part in header[:_MAX_COOKIE_HEADER].split(";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if sep and name in wanted and name not in found:
            found[name] = value.strip().strip('"')
    return found


class Pixel:
    """ASGI callable serving the pixel; see the module docstring."""

    def __init__(
        self, settings: Settings, codec: ConsentCodec, writer: BatchWriter, metrics: Metrics
    ) -> None:
        self.codec = codec
        self.consent = ConsentReader(settings.consent, codec)
        self.writer = writer
        self.client_ip = ClientIP(settings.server.trusted_proxies)
        self.vid_name = settings.visitor.cookie_name
        self.sid_name = settings.visitor.session_cookie_name
        self.honor_dnt = settings.consent.honor_dnt
        self.ip_without_consent = settings.ipstats.without_consent
        self.max_ua = settings.privacy.max_user_agent_length
        self.allowlist = tuple(
            n
            for n in settings.privacy.cookie_allowlist
            if n not in (*self.consent.cookie_names, self.vid_name, self.sid_name)
        )
        self.wanted = frozenset(
            (*self.consent.cookie_names, self.vid_name, self.sid_name, *self.allowlist)
        )
        attrs = cookie_attributes(settings.visitor)
        self._attrs = attrs
        self._sid_cookie = f"; Max-Age={settings.visitor.session_idle_minutes * 60}{attrs}"
        self._expire = tuple(
            value.encode("latin-1") for value in expiring_visitor_cookies(settings.visitor)
        )
        self._dropped_internal = metrics.hits_dropped.labels("internal_error")
        self._start_plain = {"type": "http.response.start", "status": 200, "headers": _BASE_HEADERS}
        self._body = {"type": "http.response.body", "body": GIF}
        self._head_body = {"type": "http.response.body", "body": b""}
        self._new_id = _IdSource()
        # User agents repeat from hit to hit: one shared str per distinct header value,
        # so a full write queue (queue_size hits) holds each once, not once per hit.
        self._uas: dict[bytes, str] = {}
        # A plain int, read when /metrics is scraped: a prometheus counter takes a lock.
        self.fast_answers = 0
        metrics.fast_answers.set_function(lambda: self.fast_answers)

    def _user_agent(self, value: bytes) -> str:
        ua = value[: self.max_ua].decode("latin-1")
        if len(value) <= _UA_MEMO_BYTES:  # hostile megabyte values are not kept
            if len(self._uas) >= _UA_MEMO:
                self._uas.clear()
            self._uas[value] = ua
        return ua

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            await send(
                {
                    "type": "http.response.start",
                    "status": 405,
                    "headers": [(b"allow", b"GET, HEAD"), (b"content-length", b"0")],
                }
            )
            await send(self._head_body)
            return
        start = self._start_plain
        try:
            hit, cookies = self._prepare(
                scope["headers"], scope["query_string"], scope.get("client")
            )
            if not self.writer.put_nowait(hit):
                await self.writer.put(hit)  # waits for space, or drops and counts
            if cookies:
                start = {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": (*_BASE_HEADERS, *((b"set-cookie", c) for c in cookies)),
                }
        except Exception:
            self._internal_error()
        await send(start)
        await send(self._body if method == "GET" else self._head_body)

    def answer_now(
        self, headers: Headers, query_string: bytes, client: tuple[str, int] | None
    ) -> bytes | None:
        """For a server that answers in its parser callback (``collector.protocol``): queue
        the hit and return the response's header lines, or None -- with nothing recorded --
        when the writer's buffer is full, so that the caller takes the ASGI path, which
        waits for space (back-pressure)."""
        if not self.writer.has_room():
            return None
        self.fast_answers += 1
        try:
            hit, cookies = self._prepare(headers, query_string, client)
            self.writer.put_nowait(hit)  # cannot fail: room was checked, nothing ran since
        except Exception:
            self._internal_error()
            return _BASE_BLOCK
        if not cookies:
            return _BASE_BLOCK
        return _COOKIE_LINES % (_BASE_BLOCK, *cookies)

    def _internal_error(self) -> None:
        # Last resort, on purpose: a bug in recording must never cost the store its image
        # (the pixel never fails). The hit is counted as dropped and logged.
        self._dropped_internal.inc()
        logger.exception("pixel could not record a hit")

    def _prepare(
        self, headers: Headers, query_string: bytes, client: tuple[str, int] | None
    ) -> tuple[Item, tuple[bytes, ...]]:
        """Request facts -> the hit to queue and the ``Set-Cookie`` values to answer with.

        Pure but for the clock and the id source: both paths (ASGI and the parser
        callback) queue what it returns.
        """
        cookie = ua = referer = xff = forwarded = ""
        gpc = False
        for key, value in headers:
            # httptools accepts megabyte headers and any number of them: every value is
            # capped here, before it can sit in the write queue (queue_size x hit size).
            if key == b"cookie":
                if not cookie:
                    cookie = value[:_MAX_COOKIE_HEADER].decode("latin-1")
                elif len(cookie) < _MAX_COOKIE_HEADER:
                    cookie = f"{cookie}; {value[:_MAX_COOKIE_HEADER].decode('latin-1')}"
            elif key == b"user-agent":
                known = self._uas.get(value) if len(value) <= _UA_MEMO_BYTES else None
                ua = known if known is not None else self._user_agent(value)
            elif key == b"referer":
                referer = value[:_MAX_PARAM].decode("latin-1")
            elif key == b"x-forwarded-for":
                xff = value.decode("latin-1")
            elif key == b"forwarded":
                forwarded = value.decode("latin-1")
            elif key == b"sec-gpc" or (key == b"dnt" and self.honor_dnt):
                gpc = gpc or value.strip() == b"1"
        now = time.time()
        ts_ms = int(now * 1000)
        cookies = parse_cookies(cookie, self.wanted) if cookie else {}
        consent, state = self.consent.read(cookies, now)
        page, referrer, placement = parse_pixel_query(query_string)
        if not page:
            page = referer
        if consent is None or not consent.statistics:
            if self.ip_without_consent:  # 3.3.2 security counters, off by default
                peer = client[0] if client else None
                anon = AnonHit(ts_ms, page, state, self.client_ip.resolve(peer, xff, forwarded), ua)
            else:
                anon = _tuple(AnonHit, (ts_ms, page, state, *_ANON_TAIL))
            if self.vid_name in cookies or self.sid_name in cookies:
                # No valid statistics consent: the visitor id must not live on (3.3, 5.1).
                return anon, self._expire
            return anon, ()
        vid = cookies.get(self.vid_name, "")
        if not _ID.match(vid):
            vid = self._new_id()
        sid = cookies.get(self.sid_name, "")
        if not _ID.match(sid):
            sid = self._new_id()
        ip = self.client_ip.resolve(client[0] if client else None, xff, forwarded)
        # 4.1.11: placement (ad-block) attribution only with advertising consent, and never
        # against a Global Privacy Control signal.
        if placement and (gpc or not consent.advertising):
            placement = ""
        extra = (
            tuple((n, cookies[n]) for n in self.allowlist if n in cookies) if self.allowlist else ()
        )
        hit = _tuple(
            RawHit,
            (
                ts_ms,
                ip,
                ua,
                page,
                referrer,
                placement,
                vid,
                sid,
                consent.consent_id,
                consent.policy_version,
                extra,
                *_RAW_TAIL,
            ),
        )
        max_age = self.codec.remaining_s(consent, now)
        return hit, (
            f"{self.vid_name}={vid}; Max-Age={max_age}{self._attrs}".encode(),
            f"{self.sid_name}={sid}{self._sid_cookie}".encode(),
        )
