"""The pixel through the real ASGI app: consent gates recording, the image always comes."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.app import CollectorApp, create_app
from collector.pixel import GIF
from tests.conftest import (
    IPHONE_UA,
    backend_overrides,
    client_for,
    consent_value,
    make_settings,
    rows,
)


def db_of(app: CollectorApp) -> Path:
    return Path(app.settings.storage.path)


async def stored(app: CollectorApp, sql: str) -> list[dict[str, Any]]:
    """Read through the app's own storage, so the test runs on either backend."""
    return await app.storage.fetch_all(sql)


async def values(app: CollectorApp, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in await stored(app, sql)]


async def hit(client: httpx.AsyncClient, cookie: str | None = None, **kw: object) -> httpx.Response:
    headers = dict(kw.pop("headers", {}) or {})  # type: ignore[call-overload]
    if cookie is not None:
        headers["cookie"] = cookie
    return await client.get("/p.gif", headers=headers, **kw)  # type: ignore[arg-type]


def assert_gif(resp: httpx.Response) -> None:
    assert resp.status_code == 200
    assert resp.content == GIF and len(GIF) == 43
    assert resp.headers["content-type"] == "image/gif"
    assert resp.headers["cache-control"] == "no-store, no-cache, must-revalidate, max-age=0"


async def test_pixel_serves_the_43_byte_gif_uncached(client: httpx.AsyncClient) -> None:
    assert_gif(await client.get("/p.gif"))
    head = await client.head("/p.gif")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == "43"


async def test_pixel_refuses_other_methods_without_error_page(client: httpx.AsyncClient) -> None:
    resp = await client.post("/p.gif")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, HEAD"


async def test_unconsented_hit_stores_nothing_personal(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    resp = await hit(
        client,
        cookie="session=s3cr3t-auth-token",
        params={"u": "https://shop.example/cart?email=a@b.kz", "e": "ad-top"},
        headers={"user-agent": IPHONE_UA},
    )
    assert_gif(resp)
    assert "set-cookie" not in resp.headers
    await app.writer.flush()
    assert await stored(app, "SELECT * FROM hits") == []
    counts = await values(app, "SELECT day, path, consent, hits FROM pixel_counts")
    assert counts == [(time.strftime("%Y-%m-%d", time.gmtime()), "/cart", "absent", 1)]
    if app.settings.storage.backend == "sqlite":
        raw = db_of(app).read_bytes() + Path(f"{db_of(app)}-wal").read_bytes()
        for secret in (b"s3cr3t-auth-token", b"81.2.69.142", b"iPhone", b"a@b.kz"):
            assert secret not in raw


async def test_consented_hit_records_every_field(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    before = int(time.time() * 1000)
    consent = app.codec.issue(3)
    resp = await hit(
        client,
        cookie=f"other=x; kdv_consent={app.codec.encode(consent)}",
        params={
            "u": "https://shop.example/item/42?color=red&utm_source=mail#top",
            "r": "https://www.google.com/search?q=kdv",
            "e": "ad-top",
        },
        headers={"user-agent": IPHONE_UA},
    )
    assert_gif(resp)
    vid = resp.cookies["kdv_vid"]
    sid = resp.cookies["kdv_sid"]
    await app.writer.flush()
    (row,) = await stored(app, "SELECT * FROM hits")
    assert before <= row["ts_ms"] <= int(time.time() * 1000)
    assert row["ip"] == "81.2.69.142"
    assert (row["visitor_id"], row["session_id"]) == (vid, sid)
    assert len(vid) == 32 and vid != sid
    assert row["cookies"] is None
    assert row["user_agent"] == IPHONE_UA
    assert (row["browser_family"], row["browser_version"]) == ("Mobile Safari", "14.0")
    assert (row["os_family"], row["os_version"]) == ("iOS", "14.0")
    assert (row["device_family"], row["device_brand"], row["device_class"]) == (
        "iPhone",
        "Apple",
        "mobile",
    )
    assert row["page_url"] == "https://shop.example/item/42?utm_source=mail"
    assert row["referrer_url"] == "https://www.google.com/search"
    assert row["placement_id"] == "ad-top"
    assert (row["country"], row["region"], row["city"]) == ("GB", "ENG", "London")
    assert (row["consent_id"], row["policy_version"]) == (consent.consent_id, "1")
    assert row["source"] == "web"
    assert await values(app, "SELECT path, consent, hits FROM pixel_counts") == [
        ("/item/42", "granted", 1)
    ]


async def test_page_falls_back_to_referer_header(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    await hit(
        client,
        cookie=f"kdv_consent={consent_value(app, 1)}",
        headers={"referer": "https://shop.example/catalog?page=2"},
    )
    await app.writer.flush()
    assert await values(app, "SELECT page_url, referrer_url FROM hits") == [
        ("https://shop.example/catalog", None)
    ]


async def test_visitor_and_session_ids_are_kept_across_hits(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    cookie = f"kdv_consent={consent_value(app, 1)}"
    first = await hit(client, cookie=cookie)
    vid, sid = first.cookies["kdv_vid"], first.cookies["kdv_sid"]
    second = await hit(client, cookie=f"{cookie}; kdv_vid={vid}; kdv_sid={sid}")
    assert second.cookies["kdv_vid"] == vid and second.cookies["kdv_sid"] == sid
    set_cookies = second.headers.get_list("set-cookie")
    assert any("Max-Age=1800" in c and c.startswith("kdv_sid=") for c in set_cookies)
    assert all("HttpOnly" in c and "SameSite=Lax" in c for c in set_cookies)
    await app.writer.flush()
    assert await values(app, "SELECT DISTINCT visitor_id, session_id FROM hits") == [(vid, sid)]


async def test_visitor_cookie_lives_only_as_long_as_the_consent(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    issued = time.time() - 300 * 86_400  # 65 days of the 365 left
    resp = await hit(client, cookie=f"kdv_consent={consent_value(app, 1, now=issued)}")
    vid_cookie = next(c for c in resp.headers.get_list("set-cookie") if c.startswith("kdv_vid="))
    max_age = int(vid_cookie.split("Max-Age=")[1].split(";")[0])
    assert 64 * 86_400 < max_age <= 65 * 86_400


@pytest.mark.parametrize(
    "value, state",
    [
        ("tampered", "invalid"),
        ("expired", "invalid"),
        ("malformed", "invalid"),
        ("unsigned", "invalid"),
        ("refused", "refused"),
        ("advertising-only", "refused"),
    ],
)
async def test_invalid_or_refused_consent_records_nothing(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient, value: str, state: str
) -> None:
    app, client = backend_app, backend_client
    good = consent_value(app, 1)
    cookie = {
        "tampered": good.replace(".1.1.", ".3.1.", 1),
        "expired": consent_value(app, 1, now=time.time() - 366 * 86_400),
        "malformed": "1.abc.%%%",
        "unsigned": good.rsplit(".", 1)[0],
        "refused": consent_value(app, 0),
        "advertising-only": consent_value(app, 2),
    }[value]
    resp = await hit(client, cookie=f"kdv_consent={cookie}; kdv_vid={'a' * 32}")
    assert_gif(resp)
    # A visitor id without valid statistics consent is expired at once.
    assert any(
        c.startswith("kdv_vid=;") and "Max-Age=0" in c for c in resp.headers.get_list("set-cookie")
    )
    await app.writer.flush()
    assert await stored(app, "SELECT * FROM hits") == []
    assert await values(app, "SELECT consent, hits FROM pixel_counts") == [(state, 1)]


async def test_placement_needs_advertising_consent_and_no_gpc(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    stats_only = f"kdv_consent={consent_value(app, 1)}"
    both = f"kdv_consent={consent_value(app, 3)}"
    await hit(client, cookie=stats_only, params={"e": "a1", "u": "https://s.kz/1"})
    await hit(client, cookie=both, params={"e": "a2", "u": "https://s.kz/2"})
    await hit(
        client, cookie=both, params={"e": "a3", "u": "https://s.kz/3"}, headers={"sec-gpc": "1"}
    )
    await app.writer.flush()
    assert await values(app, "SELECT page_url, placement_id FROM hits ORDER BY page_url") == [
        ("https://s.kz/1", None),
        ("https://s.kz/2", "a2"),
        ("https://s.kz/3", None),
    ]


async def test_only_allowlisted_cookies_are_stored(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    settings = make_settings(
        tmp_path,
        privacy={"cookie_allowlist": ("lang",)},
        storage=backend_overrides(tmp_path, backend, request),
    )
    app = create_app(settings)
    async with app.lifespan(app.starlette), client_for(app) as client:
        cookie = f"sessionid=TOPSECRET; lang=kk; kdv_consent={consent_value(app, 1)}; auth=XYZ"
        await hit(client, cookie=cookie)
        await app.writer.flush()
        assert await values(app, "SELECT cookies FROM hits") == [('{"lang": "kk"}',)]
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("collector.db*"))
    assert b"TOPSECRET" not in raw and b"XYZ" not in raw


async def test_hostile_input_still_gets_the_image(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    consent = f"kdv_consent={consent_value(app, 3)}"
    thousands = "; ".join(f"c{i}=v{i}" for i in range(3000))
    # The consent cookie sits past the 16 KiB we read of a Cookie header: not recorded.
    assert_gif(await hit(client, cookie=f"{thousands}; {consent}"))
    resp = await client.get(
        "/p.gif?u=https://s.kz/"
        + "%FF%00<script>alert(1)</script>" * 500
        + "&e=%00%01'; DROP TABLE hits;--&r=javascript:alert(1)",
        headers={
            "cookie": f"{consent}; {thousands}",
            "user-agent": b"\xff\x00" * 5000,
            "x-forwarded-for": "not an ip, 999.1.1.1",
        },
    )
    assert_gif(resp)
    await app.writer.flush()
    (row,) = await stored(app, "SELECT * FROM hits")
    assert row["page_url"].startswith("https://s.kz/") and len(row["page_url"]) <= 2048
    assert "\x00" not in row["page_url"] and "<script>" not in row["page_url"]
    assert len(row["user_agent"]) <= 512 and "\x00" not in row["user_agent"]
    assert row["referrer_url"] is None  # not an http(s) URL
    assert row["ip"] == "81.2.69.142"
    if app.settings.storage.backend == "sqlite":
        assert rows(db_of(app), "PRAGMA integrity_check")[0][0] == "ok"


async def test_client_ip_ignores_forwarded_headers_from_untrusted_peers(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    await hit(
        client,
        cookie=f"kdv_consent={consent_value(app, 1)}",
        headers={"x-forwarded-for": "6.6.6.6", "forwarded": "for=7.7.7.7"},
    )
    await app.writer.flush()
    assert await values(app, "SELECT ip FROM hits") == [("81.2.69.142",)]


@pytest.mark.parametrize(
    "peer, headers, expected",
    [
        # right-most untrusted hop wins; a spoofed left-most entry is ignored
        ("10.0.0.5", {"x-forwarded-for": "6.6.6.6, 81.2.69.142, 10.0.0.7"}, "81.2.69.142"),
        ("10.0.0.5", {"x-forwarded-for": "2001:db8::1"}, "2001:db8::1"),
        ("10.0.0.5", {"x-forwarded-for": "::ffff:81.2.69.142"}, "81.2.69.142"),
        ("10.0.0.5", {"forwarded": 'for="[2001:db8::7]:443";proto=https'}, "2001:db8::7"),
        ("10.0.0.5", {"forwarded": "for=81.2.69.142:1234, for=10.0.0.9"}, "81.2.69.142"),
        # malformed header: ignored as a whole, never trusted
        ("10.0.0.5", {"x-forwarded-for": "81.2.69.142, bogus"}, "10.0.0.5"),
        ("::ffff:10.0.0.5", {"x-forwarded-for": "81.2.69.142"}, "81.2.69.142"),
        ("192.0.2.1", {"x-forwarded-for": "81.2.69.142"}, "192.0.2.1"),
    ],
)
async def test_client_ip_through_trusted_proxies(
    tmp_path: Path, peer: str, headers: dict[str, str], expected: str
) -> None:
    settings = make_settings(tmp_path, server={"trusted_proxies": ("10.0.0.0/8",)})
    app = create_app(settings)
    async with app.lifespan(app.starlette), client_for(app, ip=peer) as client:
        await hit(client, cookie=f"kdv_consent={consent_value(app, 1)}", headers=headers)
        await app.writer.flush()
        assert await values(app, "SELECT ip FROM hits") == [(expected,)]


async def test_stale_policy_version_needs_reconsent_when_configured(tmp_path: Path) -> None:
    old = create_app(make_settings(tmp_path, consent={"policy_version": "2025"}))
    cookie = f"kdv_consent={consent_value(old, 1)}"
    for reconsent, expected in ((False, 1), (True, 0)):
        (tmp_path / "collector.db").unlink(missing_ok=True)
        settings = make_settings(
            tmp_path, consent={"policy_version": "2026", "require_reconsent": reconsent}
        )
        app = create_app(settings)
        async with app.lifespan(app.starlette), client_for(app) as client:
            await hit(client, cookie=cookie)
            await app.writer.flush()
        assert rows(db_of(app), "SELECT count(*) FROM hits")[0][0] == expected


async def test_health_and_metrics_report_the_writer(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    await hit(client, cookie=f"kdv_consent={consent_value(app, 1)}")
    await hit(client)
    await app.writer.flush()
    health = (await client.get("/healthz")).json()
    assert health["status"] == "ok" and health["database"] is True
    assert health["queue_depth"] == 0 and health["geoip"] is True
    text = (await client.get("/metrics")).text
    assert 'collector_hits_recorded_total{source="web"} 1.0' in text
    assert 'collector_hits_without_consent_total{state="absent"} 1.0' in text
    assert "collector_queue_depth 0.0" in text
    assert "collector_batch_write_seconds_count" in text


def two_hit_queue(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest, wait_ms: int, flush_ms: int
) -> CollectorApp:
    """An app whose write queue holds two hits."""
    storage = {
        **backend_overrides(tmp_path, backend, request),
        "queue_size": 2,
        "queue_wait_ms": wait_ms,
        "flush_interval_ms": flush_ms,
        "batch_size": 100,
    }
    return create_app(make_settings(tmp_path, storage=storage))


async def test_a_writer_that_is_behind_slows_the_pixel_instead_of_losing_hits(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    app = two_hit_queue(tmp_path, backend, request, wait_ms=5000, flush_ms=200)
    async with app.lifespan(app.starlette), client_for(app) as client:
        cookie = f"kdv_consent={consent_value(app, 1)}"
        answers = await asyncio.gather(*(hit(client, cookie=cookie) for _ in range(8)))
        for answer in answers:
            assert_gif(answer)
        await app.writer.flush()
        text = (await client.get("/metrics")).text
        # Nothing dropped: the requests waited for space.
        assert 'collector_hits_dropped_total{reason="queue_full"} 0.0' in text
        assert await values(app, "SELECT count(*) AS n FROM hits") == [(8,)]


async def test_full_queue_drops_are_counted_not_raised(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    app = two_hit_queue(tmp_path, backend, request, wait_ms=10, flush_ms=60_000)
    async with app.lifespan(app.starlette), client_for(app) as client:
        cookie = f"kdv_consent={consent_value(app, 1)}"
        for _ in range(5):
            assert_gif(await hit(client, cookie=cookie))
        text = (await client.get("/metrics")).text
        assert 'collector_hits_dropped_total{reason="queue_full"} 3.0' in text
        await app.writer.flush()
        assert await values(app, "SELECT count(*) AS n FROM hits") == [(2,)]


@contextlib.contextmanager
def write_locked(app: CollectorApp) -> Iterator[None]:
    """Another connection holds SQLite's write lock: the writer's batch waits in flight
    (within its 5 s busy timeout) until the block ends."""
    conn = sqlite3.connect(db_of(app), isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def wait_in_flight(app: CollectorApp) -> None:
    deadline = time.monotonic() + 2
    while not app.writer._in_flight:
        assert time.monotonic() < deadline, "the writer never took a batch"
        await asyncio.sleep(0.005)


async def test_the_batch_being_written_counts_against_queue_size(tmp_path: Path) -> None:
    storage = {"batch_size": 10, "queue_size": 20, "queue_wait_ms": 0}
    app = create_app(make_settings(tmp_path, storage={**storage, "flush_interval_ms": 60_000}))
    async with app.lifespan(app.starlette), client_for(app) as client:
        cookie = f"kdv_consent={consent_value(app, 1)}"
        with write_locked(app):
            for _ in range(10):
                assert_gif(await hit(client, cookie=cookie))
            await wait_in_flight(app)  # 10 hits in flight, waiting for the lock
            for _ in range(20):
                assert_gif(await hit(client, cookie=cookie))
            # At most queue_size hits are held in memory, in the queue or in flight.
            assert app.writer.depth() == 20
        await app.writer.flush()
        assert await values(app, "SELECT count(*) AS n FROM hits") == [(20,)]
        text = (await client.get("/metrics")).text
    assert 'collector_hits_dropped_total{reason="queue_full"} 10.0' in text


async def test_a_hit_that_trips_an_enrichment_bug_is_dropped_not_the_writer(
    app: CollectorApp, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert app.enricher is not None  # in-process writer
    real_row = app.enricher.row

    def buggy(hit):  # type: ignore[no-untyped-def]
        if "boom" in hit.page:
            raise ValueError("a bug in enrichment")
        return real_row(hit)

    monkeypatch.setattr(app.enricher, "row", buggy)
    cookie = f"kdv_consent={consent_value(app, 1)}"
    for page in ("https://s.kz/ok1", "https://s.kz/boom", "https://s.kz/ok2"):
        assert_gif(await hit(client, cookie=cookie, params={"u": page}))
    await app.writer.flush()
    stored = await app.storage.fetch_all("SELECT page_url FROM hits ORDER BY id")
    assert [r["page_url"] for r in stored] == ["https://s.kz/ok1", "https://s.kz/ok2"]
    text = (await client.get("/metrics")).text
    assert 'collector_hits_dropped_total{reason="internal_error"} 1.0' in text
    assert (await client.get("/healthz")).json()["writer"]["healthy"] is True


async def test_a_lone_hit_is_stored_within_about_one_flush_interval(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, storage={"flush_interval_ms": 50}))
    async with app.lifespan(app.starlette), client_for(app) as client:
        await asyncio.sleep(0.1)  # the idle writer is waiting for work
        sent = time.monotonic()
        assert_gif(await hit(client, cookie=f"kdv_consent={consent_value(app, 1)}"))
        while not await app.storage.fetch_all("SELECT id FROM hits"):
            assert time.monotonic() - sent < 0.5, "a quiet-time hit waited past the interval"
            await asyncio.sleep(0.01)
