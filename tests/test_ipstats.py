"""IP statistics (3.3.2, 4.1.4, 4.1.9): fraud rules on planted traffic, exact aggregates,
the engineer API and CLI, and the opt-in security counters without consent."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector import ipstats, subjects
from collector.aggregates import aggregators
from collector.app import CollectorApp, create_app
from collector.storage import open_storage
from collector.storage.base import Batch, HitRow
from collector.subjects import Subject
from tests.conftest import (
    GEOIP,
    IPHONE_UA,
    ROOT,
    backend_overrides,
    client_for,
    consent_value,
    make_settings,
)

PROXY = "10.0.0.1"
BROWSERS = [
    IPHONE_UA,
    "Mozilla/5.0 (X11; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/115.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/16.1 Safari/605.1.15",
]
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
NORMAL_IPS = [
    "89.160.20.128",
    "2.125.160.216",
    "175.16.199.0",
    "1.128.0.1",
    "12.81.92.1",
    "2001:1700::1",
    "198.51.100.7",
]
FARM = [f"203.0.113.{n}" for n in range(10, 30)]  # a bot farm on one /24
BURST = "216.160.83.56"  # a click burst from one address
ANONYMOUS = ["1.2.0.0", "71.160.223.0", "1.124.213.1"]  # VPN, hosting, Tor exit
CRAWLER = "1.0.0.1"  # AS15169 Google Inc.


def geo_settings(tmp_path: Path, **sections: dict[str, Any]) -> Any:
    return make_settings(
        tmp_path,
        server={"trusted_proxies": ("10.0.0.0/8",)},
        geoip={
            "city_db": str(GEOIP / "GeoIP2-City-Test.mmdb"),
            "asn_db": str(GEOIP / "GeoLite2-ASN-Test.mmdb"),
            "anonymous_db": str(GEOIP / "GeoIP2-Anonymous-IP-Test.mmdb"),
        },
        **sections,
    )


@pytest.fixture
async def app(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[CollectorApp]:
    """The app on each storage backend in turn (the upserts differ in dialect)."""
    storage = backend_overrides(tmp_path, backend, request)
    application = create_app(geo_settings(tmp_path, storage=storage))
    async with application.lifespan(application.starlette):
        yield application


def vid(n: int) -> str:
    return f"{n:032x}"


async def pixel(
    client: httpx.AsyncClient,
    ip: str,
    *,
    cookie: str = "",
    ua: str = BROWSERS[0],
    page: str | None = "https://shop.example/item/1",
) -> None:
    headers = {"x-forwarded-for": ip, "user-agent": ua}
    if cookie:
        headers["cookie"] = cookie
    params = {"u": page} if page else {}
    resp = await client.get("/p.gif", headers=headers, params=params)
    assert resp.status_code == 200


async def planted_traffic(app: CollectorApp) -> None:
    """Normal shoppers, plus the three planted patterns and a search-engine crawler."""
    consent = f"kdv_consent={consent_value(app, 1)}"
    async with client_for(app, ip=PROXY) as c:
        n = 0
        for i, ip in enumerate(NORMAL_IPS):
            for _ in range(3):  # three shoppers behind each address (home NAT)
                n += 1
                for page in range(6):
                    await pixel(
                        c,
                        ip,
                        cookie=f"{consent}; kdv_vid={vid(n)}",
                        ua=BROWSERS[(i + n) % 3],
                        page=f"https://shop.example/item/{page}",
                    )
        for ip in FARM:  # scripted, cookie-less, no page: a new visitor id every time
            for _ in range(8):
                await pixel(c, ip, cookie=consent, ua="python-requests/2.31.0", page=None)
        for page in range(130):  # one visitor clicking an ad faster than a person can
            await pixel(c, BURST, cookie=f"{consent}; kdv_vid={vid(900)}", page=f"https://s/{page}")
        for k, ip in enumerate(ANONYMOUS):
            for _ in range(4):
                await pixel(c, ip, cookie=f"{consent}; kdv_vid={vid(950 + k)}")
        for _ in range(5):
            await pixel(c, CRAWLER, cookie=consent, ua=GOOGLEBOT)
    await app.writer.flush()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_rules_flag_exactly_the_planted_ips(app: CollectorApp) -> None:
    await planted_traffic(app)
    planted = {*FARM, BURST, *ANONYMOUS}
    token = await app.tokens.create("eng", "engineer")
    async with client_for(app) as c:
        resp = await c.get("/api/ip", params={"limit": 1000}, headers=bearer(token))
    assert resp.status_code == 200
    items = {i["ip"]: i for i in resp.json()["items"]}
    assert set(items) == {*NORMAL_IPS, *planted, CRAWLER}
    flagged = {ip for ip, i in items.items() if i["score"] > 0}
    true_pos = len(flagged & planted)
    precision = true_pos / len(flagged) if flagged else 0.0
    recall = true_pos / len(planted)
    print(f"\nfraud rules: precision {precision:.2f}, recall {recall:.2f} ({len(items)} IPs)")
    assert flagged == planted
    assert {"bot_user_agent", "no_page"} <= set(items[FARM[0]]["rules"])
    assert "burst_rate" in items[BURST]["rules"]
    for ip in ANONYMOUS:
        assert items[ip]["rules"] == ["anonymous_network"]
    assert items[CRAWLER]["crawler"] == "Googlebot" and items[CRAWLER]["score"] == 0
    assert items[CRAWLER]["as_org"] == "Google Inc."
    # The list is ordered by score: the planted patterns come first.
    ranked = [i["ip"] for i in resp.json()["items"]]
    assert set(ranked[: len(planted)]) == planted
    async with client_for(app) as c:
        nets = await c.get("/api/ip", params={"kind": "network"}, headers=bearer(token))
    by_net = {i["network"]: i for i in nets.json()["items"]}
    assert by_net["203.0.113.0/24"]["score"] > 0 and by_net["203.0.113.0/24"]["ip"] is None
    assert by_net["203.0.113.0/24"]["hits"] == 160
    assert by_net["89.160.20.0/24"]["score"] == 0


async def snapshot(app: CollectorApp) -> dict[str, list[dict[str, Any]]]:
    return {
        t: await app.storage.fetch_all(f"SELECT * FROM {t} ORDER BY {order}")
        for t, order in (
            ("ipstat_daily", "day, ip"),
            ("ipstat_values", "day, ip, visitor, ua, country, botfamily"),
            ("ipstat_minute", "day, ip, minute"),
        )
    }


async def test_aggregates_equal_a_recomputation_from_raw_hits(app: CollectorApp) -> None:
    await planted_traffic(app)
    kept = await snapshot(app)
    raw = await app.storage.fetch_all(
        "SELECT ip, COUNT(*) AS hits, COUNT(DISTINCT visitor_id) AS visitors, "
        "COUNT(DISTINCT user_agent) AS uas, MIN(ts_ms) AS first_ms, MAX(ts_ms) AS last_ms, "
        "SUM(CASE WHEN device_class = 'bot' THEN 1 ELSE 0 END) AS bots, "
        "SUM(CASE WHEN page_url IS NULL THEN 1 ELSE 0 END) AS no_page FROM hits GROUP BY ip"
    )
    daily = {r["ip"]: r for r in kept["ipstat_daily"]}
    assert len(daily) == len(raw)  # one day of traffic (a run across midnight would split)
    for r in raw:
        d = daily[r["ip"]]
        assert (d["hits"], d["bot_hits"], d["no_page_hits"]) == (r["hits"], r["bots"], r["no_page"])
        assert (d["first_ms"], d["last_ms"]) == (r["first_ms"], r["last_ms"])
        values = [v for v in kept["ipstat_values"] if v["ip"] == r["ip"]]
        assert len({v["visitor"] for v in values}) == r["visitors"]
        assert len({v["ua"] for v in values}) == r["uas"]
    # ...and rebuilding every day from the raw hits gives the same rows.
    now = int(time.time() * 1000)
    async with app.storage.transaction() as tx:
        await ipstats.rebuild(tx, now - 86_400_000, now)
    assert await snapshot(app) == kept


def _visit(ts_ms: int, ip: str, visitor: str) -> HitRow:
    return HitRow(
        ts_ms, ip, visitor, "s", None, BROWSERS[0], "Mobile Safari", "16", "iOS", "16",
        "iPhone", "Apple", "mobile", "https://s.kz/", None, None, "SE", None, None, "c", "1",
        "web",
    )  # fmt: skip


async def test_value_cache_never_skips_a_row_a_rewrite_deleted(app: CollectorApp) -> None:
    # The SQLite writer leaves out value rows it stored before. An erasure, a purge or a
    # rebuild in another process deletes them; the next batch of the same visitors must
    # store them again, or distinct visitors per IP would undercount.
    now = int(time.time() * 1000)
    hits = [_visit(now + i, NORMAL_IPS[i % 3], f"visitor-{i % 5}") for i in range(30)]
    for _ in range(2):
        await app.storage.write_batch(Batch(hits=hits))
    before = await snapshot(app)
    other = open_storage(app.settings)
    await other.open()
    try:
        await subjects.erase(other, Subject("visitor", "visitor-1"), "s" * 32, [])
        await subjects.erase(other, Subject("ip", NORMAL_IPS[0]), "s" * 32, [])
    finally:
        await other.close()
    assert len((await snapshot(app))["ipstat_values"]) < len(before["ipstat_values"])
    await app.storage.write_batch(Batch(hits=hits))
    after = await snapshot(app)
    assert after["ipstat_values"] == before["ipstat_values"]


async def test_rebuild_leaves_out_blocked_subjects_and_restores_them(app: CollectorApp) -> None:
    # Blocked subjects are kept out on write by the writer's filters (governance), not by
    # the aggregator; what was counted before a block is corrected by a rebuild.
    consent = f"kdv_consent={consent_value(app, 1)}"
    async with client_for(app, ip=PROXY) as c:
        for _ in range(3):
            await pixel(c, BURST, cookie=consent)
    await app.writer.flush()
    await app.storage.execute(
        "INSERT INTO blocks (kind, value, reason, created_at, created_by) "
        "VALUES ('ip', ?, 'check', 0, 'test')",
        [BURST],
    )
    now = int(time.time() * 1000)
    async with app.storage.transaction() as tx:
        await ipstats.rebuild(tx, now, now)
    for table in ("ipstat_daily", "ipstat_minute", "ipstat_values"):
        assert await app.storage.fetch_all(f"SELECT * FROM {table}") == []
    await app.storage.execute("UPDATE blocks SET released_at = 1, released_by = 'test'")
    async with app.storage.transaction() as tx:
        await ipstats.rebuild(tx, now, now)
    row = await app.storage.fetch_one("SELECT hits FROM ipstat_daily WHERE ip = ?", [BURST])
    assert row == {"hits": 3}


async def test_writer_filters_keep_blocked_hits_out_of_the_statistics(app: CollectorApp) -> None:
    app.writer.filters.append(lambda rows: [r for r in rows if r.ip != BURST])
    consent = f"kdv_consent={consent_value(app, 1)}"
    async with client_for(app, ip=PROXY) as c:
        await pixel(c, BURST, cookie=consent)
        await pixel(c, NORMAL_IPS[0], cookie=consent)
    await app.writer.flush()
    rows = await app.storage.fetch_all("SELECT ip FROM ipstat_daily")
    assert rows == [{"ip": NORMAL_IPS[0]}]


def hit_row(ts_ms: int, ip: str, visitor: str, ua: str) -> HitRow:
    return HitRow(
        ts_ms, ip, visitor, "s" * 32, None, ua, "Firefox", "1", "Linux", "", "Other", "", "pc",
        "https://s/", None, None, "SE", None, None, "c", "1", "web",
    )  # fmt: skip


async def test_concurrent_writers_stay_exact(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    settings = geo_settings(tmp_path, storage=backend_overrides(tmp_path, backend, request))
    stores = [open_storage(settings, aggregators(settings)) for _ in range(3)]
    for s in stores:
        await s.open()
    t0 = int(time.time() * 1000)

    async def writer(k: int) -> None:
        for b in range(20):
            rows = [
                hit_row(t0 + i, f"89.160.20.{i % 7}", vid(i % 11 + 100 * (b % 2)), f"ua{i % 5}")
                for i in range(50)
            ]
            await stores[k].write_batch(Batch(hits=rows))

    try:
        await asyncio.gather(*(writer(k) for k in range(3)))
        daily = await stores[0].fetch_all(
            "SELECT net, SUM(hits) AS hits FROM ipstat_daily GROUP BY net"
        )
        visitors = await stores[0].fetch_one(
            "SELECT COUNT(DISTINCT visitor) AS n FROM ipstat_values WHERE net = '89.160.20.0/24'"
        )
        minute = await stores[0].fetch_one("SELECT SUM(hits) AS n FROM ipstat_minute")
        peak = await stores[0].fetch_one(
            "SELECT MAX(n) AS n FROM (SELECT minute, SUM(hits) AS n FROM ipstat_minute "
            "GROUP BY minute) m"
        )
    finally:
        for s in stores:
            await s.close()
    assert [(d["net"], int(d["hits"])) for d in daily] == [("89.160.20.0/24", 3 * 20 * 50)]
    assert minute is not None and int(minute["n"]) == 3000
    assert visitors == {"n": 22}
    assert peak is not None and peak["n"] >= 1500  # 3000 hits in 50 ms span at most 2 minutes


async def test_engineer_api_roles_audit_and_shapes(app: CollectorApp) -> None:
    await planted_traffic(app)
    eng = await app.tokens.create("eng", "engineer")
    ana = await app.tokens.create("ana", "analyst")
    async with client_for(app) as c:
        assert (await c.get(f"/api/ip/{BURST}")).status_code == 401
        assert (await c.get(f"/api/ip/{BURST}", headers=bearer(ana))).status_code == 403
        assert (await c.get("/api/ip", headers=bearer(ana))).status_code == 403
        resp = await c.get(f"/api/ip/::ffff:{BURST}", params={"limit": 50}, headers=bearer(eng))
        body = resp.json()
        assert body["ip"] == BURST and body["network"] == "216.160.83.0/24"
        assert body["geo"]["country"] == "US" and body["geo"]["city"] == "Milton"
        assert body["score"] >= 35 and body["signals"][0]["rule"] == "burst_rate"
        assert body["signals"][0]["threshold"] == 60 and body["signals"][0]["value"] >= 65
        assert "one minute" in body["signals"][0]["explanation"]
        day = body["days"][0]
        assert (day["hits"], day["visitors"], day["user_agents"]) == (130, 1, 1)
        assert day["first_seen"].endswith("Z") and day["countries"] == ["US"]
        # newest raw hits first, paginated with a cursor
        seen = [h["page_url"] for h in body["hits"]["items"]]
        assert seen[0] == "https://s/129" and len(seen) == 50
        nxt = await c.get(
            f"/api/ip/{BURST}", params={"cursor": body["hits"]["next_cursor"]}, headers=bearer(eng)
        )
        assert nxt.json()["hits"]["items"][0]["page_url"] == "https://s/79"
        empty = (await c.get("/api/ip/192.0.2.99", headers=bearer(eng))).json()
        assert empty["score"] == 0 and empty["days"] == [] and empty["hits"]["items"] == []
        bad = await c.get("/api/ip/999.1.2.3", headers=bearer(eng))
        assert bad.status_code == 400 and "999.1.2.3" in bad.json()["detail"]
        huge = {"cursor": "1." + "9" * 19}  # past a 64-bit id: once a 500
        bad = await c.get(f"/api/ip/{BURST}", params=huge, headers=bearer(eng))
        assert bad.status_code == 400 and bad.json()["detail"].startswith("cursor")
        csv_day = await c.get(f"/api/ip/{BURST}", params={"format": "csv"}, headers=bearer(eng))
        assert csv_day.text.splitlines()[0].startswith("date,hits,visitors")
        csv_top = await c.get("/api/ip", params={"format": "csv"}, headers=bearer(eng))
        assert csv_top.headers["content-type"].startswith("text/csv")
        assert csv_top.text.splitlines()[0] == (
            "ip,network,score,rules,hits,visitors,country,asn,as_org,crawler"
        )
    lookups = await app.audit.entries(action="ip.lookup")
    assert {e["subject"] for e in lookups} >= {BURST, "999.1.2.3", "192.0.2.99"}
    assert all(e["actor"] in ("eng", "ana") for e in lookups)


async def test_blocked_hits_are_shown_to_admins_only(app: CollectorApp) -> None:
    consent = f"kdv_consent={consent_value(app, 1)}"
    async with client_for(app, ip=PROXY) as c:
        await pixel(c, BURST, cookie=f"{consent}; kdv_vid={vid(5)}")
    await app.writer.flush()
    await app.storage.execute(
        "INSERT INTO blocks (kind, value, reason, created_at, created_by) "
        "VALUES ('visitor', ?, 'check', 0, 'test')",
        [vid(5)],
    )
    eng = await app.tokens.create("eng", "engineer")
    root = await app.tokens.create("root", "admin")
    async with client_for(app) as c:
        as_eng = (await c.get(f"/api/ip/{BURST}", headers=bearer(eng))).json()
        as_admin = (await c.get(f"/api/ip/{BURST}", headers=bearer(root))).json()
    assert as_eng["hits"]["items"] == []
    assert [h["blocked"] for h in as_admin["hits"]["items"]] == [True]


async def unconsented_traffic(app: CollectorApp) -> None:
    async with client_for(app, ip=PROXY) as c:
        for ua in ("SecretBrowser/9.9 uniq-ua-marker", GOOGLEBOT, "curl/8.0"):
            await pixel(
                c,
                "198.51.100.77",
                cookie="session=s3cr3t-auth-token",
                ua=ua,
                page="https://shop.example/secret-page-marker",
            )
    await app.writer.flush()


def db_bytes(app: CollectorApp) -> bytes:
    db = Path(app.settings.storage.path)
    wal = Path(f"{db}-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


async def test_security_counters_without_consent_are_off_by_default(app: CollectorApp) -> None:
    assert app.settings.ipstats.without_consent is False
    await unconsented_traffic(app)
    assert await app.storage.fetch_all("SELECT * FROM ipstat_unconsented") == []
    if app.settings.storage.backend == "sqlite":
        assert b"198.51.100.77" not in db_bytes(app)


async def test_security_counters_without_consent_keep_no_ua_cookie_or_url(
    tmp_path: Path,
) -> None:
    app = create_app(geo_settings(tmp_path, ipstats={"without_consent": True}))
    async with app.lifespan(app.starlette):
        await unconsented_traffic(app)
        rows = await app.storage.fetch_all("SELECT * FROM ipstat_unconsented")
        assert [(r["ip"], r["hits"], r["bot_hits"], r["crawler_hits"]) for r in rows] == [
            ("198.51.100.77", 3, 1, 1)
        ]
        assert await app.storage.fetch_all("SELECT * FROM hits") == []
        raw = db_bytes(app)
        assert b"198.51.100.77" in raw
        # The URL never reaches storage; only the anonymous per-page counter (pixel_counts,
        # no IP, unchanged by this option) keeps the path, as it always did.
        for secret in (b"uniq-ua-marker", b"SecretBrowser", b"s3cr3t", b"shop.example"):
            assert secret not in raw
        eng = await app.tokens.create("eng", "engineer")
        ana = await app.tokens.create("ana", "analyst")
        async with client_for(app) as c:
            body = (await c.get("/api/ip/198.51.100.77", headers=bearer(eng))).json()
            assert body["days"][0]["unconsented"]["hits"] == 3
            assert "bot_user_agent" in body["days"][0]["rules"]
            assert (await c.get("/api/ip/198.51.100.77", headers=bearer(ana))).status_code == 403
        # kept without_consent_days, then purged
        async with app.storage.transaction() as tx:
            later = int(time.time() * 1000) + 8 * 86_400_000
            for sql, params in ipstats.unconsented_purge(later, 7):
                await tx.executemany(sql, params)
        assert await app.storage.fetch_all("SELECT * FROM ipstat_unconsented") == []


def test_cli_ip_lookup_and_top_are_audited(tmp_path: Path) -> None:
    settings = geo_settings(tmp_path)

    async def seed() -> None:
        app = create_app(settings)
        async with app.lifespan(app.starlette):
            await planted_traffic(app)

    asyncio.run(seed())
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "COLLECTOR_STORAGE_PATH": settings.storage.path,
        "COLLECTOR_CONSENT_SECRET": settings.consent.secret,
        "COLLECTOR_GEOIP_CITY_DB": settings.geoip.city_db,
        "COLLECTOR_GEOIP_ASN_DB": settings.geoip.asn_db,
        "COLLECTOR_GEOIP_ANONYMOUS_DB": settings.geoip.anonymous_db,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "collector", *args], env=env, capture_output=True, text=True
        )

    one = cli("ip", BURST)
    assert one.returncode == 0, one.stderr
    assert "burst_rate" in one.stdout and "Milton" in one.stdout
    top = cli("ip", "--top", "5")
    assert top.returncode == 0 and top.stdout.count("203.0.113.") >= 4
    bad = cli("ip", "not-an-ip")
    assert bad.returncode == 1 and "not-an-ip" in bad.stderr
    audit = cli("audit", "list", "--action", "ip.lookup").stdout
    assert BURST in audit and "cli:" in audit


def test_settings_validate_fraud_thresholds(tmp_path: Path) -> None:
    from collector.config import load_settings
    from collector.errors import ConfigError

    with pytest.raises(ConfigError, match=r"fraud\.burst_per_minute"):
        load_settings(None, environ={"COLLECTOR_FRAUD_BURST_PER_MINUTE": "0"})
    assert dataclasses.asdict(load_settings(None, environ={}).ipstats) == {
        "without_consent": False,
        "without_consent_days": 7,
    }
