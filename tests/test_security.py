"""Security checks as tests: spoofed client IPs, foreign cookies, secrets in logs, headers.

Each runs against a real ``collector serve`` process where the property depends on the
server (uvicorn's proxy handling, its log output), and through the ASGI app otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from collector.auth import TokenStore
from collector.security import CONTENT_SECURITY_POLICY
from collector.storage import open_storage
from tests.conftest import SECRET, Server, make_settings, rows
from tests.test_server import cookie_for

SPOOFED = "81.2.69.142"


async def make_tokens(tmp_path: Path) -> dict[str, str]:
    """One token per role in the database the ``serve`` fixture will use."""
    storage = open_storage(make_settings(tmp_path))
    await storage.open()
    try:
        store = TokenStore(storage)
        return {role: await store.create(f"t-{role}", role) for role in TOKEN_ROLES}
    finally:
        await storage.close()


TOKEN_ROLES = ("analyst", "engineer", "admin")


# --- client IP ---------------------------------------------------------------------------


@pytest.mark.slow
def test_forwarded_headers_from_an_untrusted_peer_are_ignored(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve()
    with httpx.Client(base_url=server.url, headers={"cookie": cookie_for()}) as c:
        c.get("/p.gif", params={"u": "https://s.kz/xff"}, headers={"x-forwarded-for": SPOOFED})
        c.get("/p.gif", params={"u": "https://s.kz/fwd"}, headers={"forwarded": f"for={SPOOFED}"})
        c.get(
            "/p.gif",
            params={"u": "https://s.kz/both"},
            headers={"x-forwarded-for": SPOOFED, "x-real-ip": SPOOFED, "forwarded": "for=1.2.3.4"},
        )
    server.stop()
    stored = rows(tmp_path / "collector.db", "SELECT page_url, ip FROM hits ORDER BY id")
    assert [tuple(r) for r in stored] == [
        ("https://s.kz/xff", "127.0.0.1"),
        ("https://s.kz/fwd", "127.0.0.1"),
        ("https://s.kz/both", "127.0.0.1"),
    ]


@pytest.mark.slow
def test_forwarded_header_from_a_trusted_proxy_names_the_client(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    # The control for the test above: the same request through a configured proxy.
    server = serve(env={"COLLECTOR_SERVER_TRUSTED_PROXIES": "127.0.0.1/32"})
    with httpx.Client(base_url=server.url, headers={"cookie": cookie_for()}) as c:
        c.get("/p.gif", params={"u": "https://s.kz/"}, headers={"x-forwarded-for": SPOOFED})
    server.stop()
    assert rows(tmp_path / "collector.db", "SELECT ip FROM hits")[0][0] == SPOOFED


# --- cookies -----------------------------------------------------------------------------


@pytest.mark.slow
def test_no_cookie_outside_the_allowlist_is_ever_stored(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve(env={"COLLECTOR_PRIVACY_COOKIE_ALLOWLIST": "ab_group"})
    foreign = {
        "sessionid": "MARKER-session-7f3a",
        "auth_token": "MARKER-auth-91bc",
        "_ga": "MARKER-ga-1234",
        "AB_GROUP": "MARKER-case-variant",  # cookie names are case-sensitive
        "cart": "MARKER-cart-" + "x" * 200,
    }
    cookie = "; ".join(f"{k}={v}" for k, v in foreign.items())
    with httpx.Client(base_url=server.url) as c:
        for consent in (cookie_for(3), cookie_for(0), ""):
            c.get(
                "/p.gif",
                params={"u": "https://s.kz/"},
                headers={"cookie": "; ".join(filter(None, (cookie, "ab_group=B", consent)))},
            )
    server.stop()
    db = tmp_path / "collector.db"
    assert [r[0] for r in rows(db, "SELECT cookies FROM hits")] == ['{"ab_group": "B"}']
    # Every byte the database left on disk, WAL and shared memory included.
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("collector.db*") if p.is_file())
    assert b"MARKER" not in raw


# --- logs --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_tokens_secrets_and_cookies_never_reach_the_log(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    tokens = await make_tokens(tmp_path)
    server = serve(
        env={"COLLECTOR_SERVER_LOG_LEVEL": "debug", "COLLECTOR_SERVER_ACCESS_LOG": "true"}
    )
    consent = cookie_for(3)
    wrong = "kdv_" + "WrongTokenValue" * 3
    async with httpx.AsyncClient(base_url=server.url) as c:
        for token in tokens.values():
            r = await c.get("/api/whoami", headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200
        for _ in range(12):  # past the failure limit: warnings are logged
            r = await c.get("/api/audit", headers={"authorization": f"Bearer {wrong}"})
            assert r.status_code in (401, 429)
        await c.get("/api/audit", headers={"authorization": f"Basic {wrong}"})
        await c.get("/p.gif", params={"u": "https://s.kz/"}, headers={"cookie": consent})
        vid = (await c.get("/p.gif", headers={"cookie": consent})).cookies["kdv_vid"]
    server.stop()
    log = server.log.read_text(errors="replace")
    assert "unauthorised access attempt" in log  # the log did see the failures...
    for secret in (*tokens.values(), wrong, SECRET, consent.partition("=")[2], vid):
        assert secret not in log  # ...but never a credential, cookie or visitor id
    for token in tokens.values():
        assert token[len("kdv_") :][:12] not in log


# --- response headers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/healthz", 200),
        ("/metrics", 200),
        ("/api/whoami", 401),
        ("/api/audit?limit=x", 401),
        ("/no/such/page", 404),
    ],
)
async def test_every_non_pixel_response_carries_the_security_headers(
    client: httpx.AsyncClient, path: str, status: int
) -> None:
    resp = await client.get(path)
    assert resp.status_code == status
    csp = resp.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["referrer-policy"] == "no-referrer"


async def test_the_pixel_keeps_its_own_headers(client: httpx.AsyncClient) -> None:
    resp = await client.get("/p.gif")
    assert resp.headers["cross-origin-resource-policy"] == "cross-origin"
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in resp.headers
    assert "x-frame-options" not in resp.headers


async def test_a_route_may_set_its_own_policy_openly() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from collector.security import SecurityHeaders

    async def demo(request: object) -> PlainTextResponse:
        return PlainTextResponse("x", headers={"content-security-policy": "default-src 'none'"})

    app = SecurityHeaders(Starlette(routes=[Route("/demo/shop", demo), Route("/api/x", demo)]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        shop = await c.get("/demo/shop")
        api = await c.get("/api/x")
    assert shop.headers["content-security-policy"] == "default-src 'none'"
    # The demo store page lets the pixel it embeds fall back to the Referer header.
    assert shop.headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert api.headers["referrer-policy"] == "no-referrer"
