"""The pixel answered in uvicorn's parser callback (collector/protocol.py), through a real
``collector serve`` on loopback and raw sockets: the same bytes as the ASGI path, the same
hits, and uvicorn's connection behaviour kept (pipelining order, keep-alive and its
timeout, HTTP/1.0, back-pressure)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from collector.config import load_settings
from collector.consent import ConsentCodec
from tests.conftest import IPHONE_UA, SECRET, Server, rows

pytestmark = pytest.mark.slow

VID = "0123456789abcdef0123456789abcdef"
SID = "fedcba9876543210fedcba9876543210"


def consent_cookie(purposes: int = 3) -> str:
    settings = load_settings(None, environ={"COLLECTOR_CONSENT_SECRET": SECRET})
    codec = ConsentCodec(settings.consent)
    return f"kdv_consent={codec.encode(codec.issue(purposes))}"


def request(
    path: str = "/p.gif?u=https%3A%2F%2Fs.kz%2Fa&e=ad-top",
    *,
    method: str = "GET",
    version: str = "1.1",
    cookie: str = "",
    extra: str = "",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: stats.s.kz", f"User-Agent: {IPHONE_UA}"]
    if cookie:
        lines.append(f"Cookie: {cookie}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


class Conn:
    """One keep-alive connection, read response by response."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, head_only: bool = False) -> tuple[str, list[tuple[str, str]], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = [(k.lower(), v) for k, _, v in (line.partition(": ") for line in lines)]
        size = 0 if head_only else int(dict(headers).get("content-length", "0"))
        while len(self.buf) < size:
            self._read()
        body, self.buf = self.buf[:size], self.buf[size:]
        return status, headers, body

    def closed_by_server(self, within: float) -> bool:
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def comparable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers without what legitimately differs between two answers a second apart (the
    date, the consent's remaining seconds, a new visitor's random ids)."""

    def same(value: str) -> str:
        value = re.sub(r"Max-Age=\d+", "Max-Age=N", value)
        return re.sub(r"=[0-9a-f]{32};", "=<new id>;", value)

    return [(k, same(v)) for k, v in headers if k != "date"]


def fast_answers(server: Server) -> int:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(r"^collector_pixel_fast_path_answers (\S+)$", text, re.M)
    assert match, "the fast-path metric is missing"
    return int(float(match.group(1)))


@pytest.fixture
def both(serve: Callable[..., Server], tmp_path: Path) -> tuple[Server, Server]:
    fast = serve()
    asgi = serve(
        env={
            "COLLECTOR_SERVER_FAST_PATH": "false",
            "COLLECTOR_STORAGE_PATH": str(tmp_path / "asgi.db"),
        }
    )
    return fast, asgi


@pytest.mark.parametrize(
    ("name", "cookie", "method", "version"),
    [
        ("consented", f"{consent_cookie()}; kdv_vid={VID}; kdv_sid={SID}", "GET", "1.1"),
        ("new visitor", consent_cookie(), "GET", "1.1"),
        ("no consent", "", "GET", "1.1"),
        ("withdrawn, ids expire", f"{consent_cookie(0)}; kdv_vid={VID}", "GET", "1.1"),
        ("head", f"{consent_cookie()}; kdv_vid={VID}; kdv_sid={SID}", "HEAD", "1.1"),
        ("http/1.0", f"{consent_cookie()}; kdv_vid={VID}; kdv_sid={SID}", "GET", "1.0"),
    ],
)
def test_the_fast_path_answers_what_the_asgi_path_answers(
    both: tuple[Server, Server], name: str, cookie: str, method: str, version: str
) -> None:
    answers = []
    for server in both:
        conn = Conn(server)
        conn.send(request(method=method, version=version, cookie=cookie))
        answers.append(conn.response(head_only=method == "HEAD"))
        conn.close()
    (status, headers, body), (asgi_status, asgi_headers, asgi_body) = answers
    assert (status, comparable(headers), body) == (
        asgi_status,
        comparable(asgi_headers),
        asgi_body,
    )
    assert status == "HTTP/1.1 200 OK" and dict(headers)["content-type"] == "image/gif"
    assert re.match(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", dict(headers)["date"])
    assert len(body) == (0 if method == "HEAD" else 43)
    # The fast server really took the fast path; the other never did.
    assert (fast_answers(both[0]), fast_answers(both[1])) == (1, 0)


def test_fast_path_hits_are_stored_like_asgi_hits(
    both: tuple[Server, Server], tmp_path: Path
) -> None:
    cookie = f"{consent_cookie()}; kdv_vid={VID}; kdv_sid={SID}"
    for server in both:
        conn = Conn(server)
        for page in ("a", "b"):
            conn.send(
                request(f"/p.gif?u=https%3A%2F%2Fs.kz%2F{page}%3Futm_source%3Dm&e=x", cookie=cookie)
            )
            conn.response()
        conn.send(request(cookie=""))  # no consent: counted only
        conn.response()
        conn.close()
        server.stop()
    columns = (
        "ip, visitor_id, session_id, page_url, placement_id, browser_family, os_family, "
        "device_class, consent_id, policy_version, source"
    )
    sql = f"SELECT {columns} FROM hits ORDER BY id"
    fast = [tuple(r) for r in rows(tmp_path / "collector.db", sql)]
    assert fast == [tuple(r) for r in rows(tmp_path / "asgi.db", sql)]
    assert [r[3] for r in fast] == ["https://s.kz/a?utm_source=m", "https://s.kz/b?utm_source=m"]
    assert {r[1] for r in fast} == {VID}
    counts = "SELECT consent, sum(hits) FROM pixel_counts GROUP BY consent ORDER BY consent"
    assert [tuple(r) for r in rows(tmp_path / "collector.db", counts)] == [
        ("absent", 1),
        ("granted", 2),
    ]


def test_pipelined_requests_are_answered_in_order(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve()
    cookie = f"{consent_cookie()}; kdv_vid={VID}; kdv_sid={SID}"
    conn = Conn(server)
    # Fast, ordinary (an ASGI route), fast again, all in one write: the third must wait
    # for the second's response instead of overtaking it.
    conn.send(
        request("/p.gif?u=https%3A%2F%2Fs.kz%2F1", cookie=cookie)
        + request("/healthz")
        + request("/p.gif?u=https%3A%2F%2Fs.kz%2F2", cookie=cookie)
        + request("/p.gif?u=https%3A%2F%2Fs.kz%2F3", cookie=cookie)
    )
    kinds = [dict(conn.response()[1])["content-type"] for _ in range(4)]
    assert kinds == ["image/gif", "application/json", "image/gif", "image/gif"]
    conn.close()
    server.stop()
    pages = [r[0] for r in rows(tmp_path / "collector.db", "SELECT page_url FROM hits ORDER BY id")]
    assert pages == ["https://s.kz/1", "https://s.kz/2", "https://s.kz/3"]


def test_keep_alive_outlives_pipelined_answers_and_idle_connections_close(
    serve: Callable[..., Server],
) -> None:
    server = serve(env={"COLLECTOR_SERVER_KEEP_ALIVE_S": "1"})
    conn = Conn(server)
    # Three answers from one read, then busy for twice the timeout: it stays open.
    conn.send(request() + request() + request())
    for _ in range(3):
        conn.response()
    deadline = time.monotonic() + 2.2
    while time.monotonic() < deadline:
        time.sleep(0.3)
        conn.send(request())
        assert conn.response()[0] == "HTTP/1.1 200 OK"
    # Idle past the timeout: closed, as uvicorn closes any idle keep-alive connection.
    assert conn.closed_by_server(within=3)
    conn.close()


def test_http10_and_connection_close_are_answered_then_closed(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    for raw in (request(version="1.0"), request(extra="Connection: close\r\n")):
        conn = Conn(server)
        conn.send(raw)
        status, headers, body = conn.response()
        assert status == "HTTP/1.1 200 OK" and len(body) == 43
        assert ("connection", "close") in headers
        assert conn.closed_by_server(within=2)
        conn.close()
    assert fast_answers(server) == 2


def test_a_full_buffer_sends_the_pixel_through_the_waiting_path(
    serve: Callable[..., Server],
) -> None:
    # One hit fills the buffer for the whole (long) flush interval: the next request
    # cannot be queued at once, so it takes the ASGI path, which waits for space
    # (queue_wait_ms) and then drops the hit and counts it -- it still gets its image.
    server = serve(
        env={
            "COLLECTOR_STORAGE_QUEUE_SIZE": "1",
            "COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": "3000",
            "COLLECTOR_STORAGE_QUEUE_WAIT_MS": "400",
        }
    )
    cookie = f"{consent_cookie()}; kdv_vid={VID}; kdv_sid={SID}"
    conn = Conn(server)
    conn.send(request(cookie=cookie))
    assert conn.response()[0] == "HTTP/1.1 200 OK"
    started = time.monotonic()
    conn.send(request(cookie=cookie))
    status, _, body = conn.response()
    waited = time.monotonic() - started
    conn.close()
    assert status == "HTTP/1.1 200 OK" and len(body) == 43
    assert waited >= 0.35
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'collector_hits_dropped_total{reason="queue_full"} 1.0' in metrics
    assert fast_answers(server) == 1


def test_access_log_turns_the_fast_path_off(serve: Callable[..., Server]) -> None:
    server = serve(env={"COLLECTOR_SERVER_ACCESS_LOG": "true"})
    assert httpx.get(f"{server.url}/p.gif").status_code == 200
    assert fast_answers(server) == 0
