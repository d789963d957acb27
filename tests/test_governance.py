"""Personal-data governance through the real app: access rules (5.5), blocking (6.2.4),
subject export and erasure, breach report (5.4), retention (5.1)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector import ipstats, retention, subject_hours, subjects
from collector.app import CollectorApp, create_app
from collector.config import Settings
from collector.consent_records import ConsentRecord
from collector.storage.base import Batch, HitRow, Transaction
from collector.storage.sqlite import SQLiteStorage
from collector.visibility import VISIBLE
from tests.conftest import client_for, consent_value, make_settings

DAY = 86_400_000
ALICE = "a" * 32
BOB = "b" * 32
NOW = int(time.time() * 1000)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def hit_row(
    ts_ms: int, visitor: str = ALICE, ip: str = "81.2.69.142", consent: str = "c-1"
) -> HitRow:
    return HitRow(
        ts_ms, ip, visitor, "s" * 32, '{"cart":"7"}', "Mozilla/5.0 (iPhone)", "Mobile Safari",
        "14.0", "iOS", "14.0", "iPhone", "Apple", "mobile", "https://s.kz/a", None, None,
        "GB", "ENG", "London", consent, "1", "web",
    )  # fmt: skip


async def store(app: CollectorApp, *hits: HitRow) -> None:
    await app.storage.write_batch(Batch(hits=hits))


async def store_elsewhere(app: CollectorApp, ts_ms: int, ip: str, visitor: str) -> None:
    """A hit that the app's writer did not write. On PostgreSQL a plain INSERT, whose
    hours the triggers note (any node, any path). On SQLite only the batch writer
    inserts hits (a test forbids any other code): another writer on the same file, as
    the CLI or a second process has, which notes the hours of what it stores."""
    if app.settings.storage.backend == "postgres":
        await app.storage.execute(
            "INSERT INTO hits (ts_ms, ip, visitor_id, session_id, user_agent, browser_family, "
            "browser_version, os_family, os_version, device_family, device_brand, "
            "device_class, consent_id, policy_version) VALUES (?, ?, ?, 's', 'ua', 'b', '1', "
            "'o', '1', 'd', 'x', 'desktop', 'c-2', '1')",
            [ts_ms, ip, visitor],
        )
        return
    other = SQLiteStorage(app.settings)
    await other.open()
    try:
        await other.write_batch(Batch(hits=[hit_row(ts_ms, visitor=visitor, ip=ip)]))
    finally:
        await other.close()


async def count(app: CollectorApp, sql: str, params: list[Any] | None = None) -> int:
    row = await app.storage.fetch_one(sql, params or [])
    assert row is not None
    return int(next(iter(row.values())))


class DailyRollup:
    """A stand-in for the stats rollups: a real table, rebuilt from visible hits through
    the ``aggregates.rebuilders`` contract, with every call remembered."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    async def __call__(self, tx: Transaction, lo: int, hi: int) -> None:
        self.calls.append((lo, hi))
        first, last = lo // DAY, (hi - 1) // DAY
        await tx.execute("DELETE FROM daily WHERE day BETWEEN ? AND ?", [first, last])
        await tx.execute(
            "INSERT INTO daily (day, hits) SELECT ts_ms / 86400000, count(*) FROM hits "
            f"WHERE ts_ms >= ? AND ts_ms < ? AND {VISIBLE} GROUP BY ts_ms / 86400000",
            [first * DAY, (last + 1) * DAY],
        )

    @staticmethod
    async def total(app: CollectorApp) -> int:
        return await count(app, "SELECT coalesce(sum(hits), 0) AS n FROM daily")


@pytest.fixture
async def app(backend_app: CollectorApp) -> CollectorApp:
    """The governance tests run on SQLite and on PostgreSQL."""
    return backend_app


@pytest.fixture
async def rollup(app: CollectorApp) -> DailyRollup:
    await app.storage.execute("CREATE TABLE daily (day INTEGER PRIMARY KEY, hits INTEGER)")
    found = DailyRollup()
    app.governance.rebuilders.append(found)
    app.governance.settle_s = 0.05
    return found


@pytest.fixture
async def tokens(app: CollectorApp) -> dict[str, str]:
    return {role: await app.tokens.create(role, role) for role in ("analyst", "engineer", "admin")}


ADMIN_ROUTES = [
    ("GET", "/api/admin/blocks", None),
    ("POST", "/api/admin/blocks", {"visitor": ALICE, "reason": "x"}),
    ("DELETE", "/api/admin/blocks/1", None),
    ("GET", f"/api/admin/subjects?visitor={ALICE}", None),
    ("GET", "/api/admin/subjects?ip=81.2.69.142", None),
    ("POST", "/api/admin/subjects/erase", {"visitor": ALICE}),
    ("GET", "/api/admin/incident?from=2020-01-01&to=2030-01-01", None),
    ("GET", "/api/admin/retention", None),
    ("POST", "/api/admin/retention/run", None),
    ("GET", "/api/audit", None),
]


@pytest.mark.parametrize("role", ["analyst", "engineer"])
async def test_hit_and_ip_level_governance_routes_are_admin_only(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str], role: str
) -> None:
    await store(app, hit_row(NOW))
    for method, url, body in ADMIN_ROUTES:
        resp = await client.request(method, url, json=body, headers=bearer(tokens[role]))
        assert resp.status_code == 403, (method, url)
        assert resp.json()["error"] == "forbidden"
    assert await count(app, "SELECT count(*) AS n FROM hits") == 1  # nothing was erased
    assert await count(app, "SELECT count(*) AS n FROM blocks") == 0
    denied = await app.audit.entries(limit=1000)
    assert sum(e["outcome"] == "403" for e in denied) == len(ADMIN_ROUTES)


async def test_blocked_visitor_is_no_longer_recorded_and_vanishes_from_stats(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str], rollup: DailyRollup
) -> None:
    consent = consent_value(app)
    alice = {"cookie": f"kdv_consent={consent}; kdv_vid={ALICE}"}
    bob = {"cookie": f"kdv_consent={consent}; kdv_vid={BOB}"}
    await client.get("/p.gif", headers=alice)
    await client.get("/p.gif", headers=bob)
    await store(app, hit_row(NOW - 3 * DAY))
    await app.writer.flush()
    async with app.storage.transaction() as tx:
        await rollup(tx, NOW - 5 * DAY, NOW + DAY)
    assert await DailyRollup.total(app) == 3

    admin = bearer(tokens["admin"])
    made = await client.post(
        "/api/admin/blocks", json={"visitor": ALICE, "reason": "request #17"}, headers=admin
    )
    assert made.status_code == 201, made.text
    block = made.json()
    assert block["kind"] == "visitor" and block["created_by"] == "admin"
    assert (NOW - 3 * DAY, block["span_ms"][1]) in rollup.calls
    # Old hits: out of the rollup and hidden by the shared view condition.
    assert await DailyRollup.total(app) == 1
    assert await count(app, f"SELECT count(*) AS n FROM hits WHERE {VISIBLE}") == 1
    # New hits: not recorded at all, queued ones included; counted as dropped.
    for _ in range(3):
        await client.get("/p.gif", headers=alice)
    await client.get("/p.gif", headers=bob)
    await app.writer.flush()
    assert await count(app, "SELECT count(*) AS n FROM hits WHERE visitor_id = ?", [ALICE]) == 2
    assert await count(app, "SELECT count(*) AS n FROM hits WHERE visitor_id = ?", [BOB]) == 2
    metrics = (await client.get("/metrics")).text
    assert 'collector_hits_dropped_total{reason="blocked"} 3.0' in metrics
    # The admin still sees everything.
    listed = (await client.get("/api/admin/blocks", headers=admin)).json()
    assert [b["value"] for b in listed["items"]] == [ALICE]
    again = await client.post(
        "/api/admin/blocks", json={"visitor": ALICE, "reason": "twice"}, headers=admin
    )
    assert again.status_code == 409 and "blocked already" in again.json()["detail"]

    released = await client.delete(f"/api/admin/blocks/{block['id']}", headers=admin)
    assert released.status_code == 200 and released.json()["released_by"] == "admin"
    # An id past 64 bits cannot name a block (it once overflowed the driver: a 500).
    huge = await client.delete(f"/api/admin/blocks/{2**64}", headers=admin)
    assert huge.status_code == 404
    assert await DailyRollup.total(app) == 4  # Alice's two hits are back, beside Bob's two
    await client.get("/p.gif", headers=alice)
    await app.writer.flush()
    assert await count(app, "SELECT count(*) AS n FROM hits WHERE visitor_id = ?", [ALICE]) == 3

    audit = await app.audit.entries(limit=100)
    by_action = {e["action"]: e for e in audit}
    assert by_action["block.add"]["subject"] == ALICE
    assert json.loads(by_action["block.add"]["detail"])["kind"] == "visitor"
    assert by_action["block.release"]["subject"] == ALICE
    assert (await app.audit.verify()).ok


async def test_ip_block_drops_hits_from_that_address_only(
    app: CollectorApp, tokens: dict[str, str]
) -> None:
    consent = consent_value(app)
    blocked, other = client_for(app, "2.125.160.216"), client_for(app, "81.2.69.142")
    async with blocked, other:
        made = await other.post(
            "/api/admin/blocks",
            json={"ip": "::ffff:2.125.160.216", "reason": "authority request"},
            headers=bearer(tokens["admin"]),
        )
        assert made.json()["value"] == "2.125.160.216"  # stored in the canonical form
        for c in (blocked, other):
            await c.get("/p.gif", headers={"cookie": f"kdv_consent={consent}"})
    await app.writer.flush()
    ips = await app.storage.fetch_all("SELECT ip FROM hits")
    assert ips == [{"ip": "81.2.69.142"}]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"reason": "x"}, "exactly one subject"),
        ({"visitor": ALICE, "ip": "1.2.3.4", "reason": "x"}, "exactly one subject"),
        ({"ip": "1.2.3.999", "reason": "x"}, "ip: not an IP address"),
        ({"visitor": "a b", "reason": "x"}, "visitor: not a visitor id"),
        ({"visitor": ALICE}, "reason: required"),
        ({"visitor": ALICE, "reason": "  "}, "reason: say why"),
    ],
)
async def test_bad_block_requests_say_what_is_wrong(
    client: httpx.AsyncClient, tokens: dict[str, str], body: dict[str, str], message: str
) -> None:
    resp = await client.post("/api/admin/blocks", json=body, headers=bearer(tokens["admin"]))
    assert resp.status_code == 400 and message in resp.json()["detail"]


async def _consent_records(app: CollectorApp) -> None:
    """Real consent records (the consent feature's append-only table) for Alice and Bob."""
    for consent_id, ip in (("c-1", "81.2.69.142"), ("c-9", "1.1.1.1")):
        await app.consent_records.append(
            ConsentRecord(
                consent_id=consent_id,
                previous_id=None,
                action="grant",
                statistics=True,
                advertising=True,
                policy_version="1",
                decided_at_ms=NOW,
                source="post-json",
                origin="https://s.kz",
                user_agent_family="Mobile Safari",
                ip_hash=app.consent_records.ip_hash(ip),
                gpc=False,
            )
        )


async def test_subject_export_holds_everything_about_the_visitor(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str]
) -> None:
    await _consent_records(app)
    await store(app, hit_row(NOW - DAY), hit_row(NOW), hit_row(NOW, visitor=BOB, consent="c-9"))
    admin = bearer(tokens["admin"])
    await client.post("/api/admin/blocks", json={"visitor": ALICE, "reason": "r"}, headers=admin)
    data = (await client.get(f"/api/admin/subjects?visitor={ALICE}", headers=admin)).json()
    assert data["subject"] == {"kind": "visitor", "value": ALICE}
    assert [h["ts_ms"] for h in data["hits"]] == [NOW - DAY, NOW]  # blocked rows too
    assert data["hits"][0]["user_agent"] == "Mozilla/5.0 (iPhone)"
    assert [r["consent_id"] for r in data["consent_records"]] == ["c-1"]
    assert [b["reason"] for b in data["blocks"]] == ["r"]
    assert [a["action"] for a in data["audit"]] == ["block.add"]  # who processed it
    assert data["ipstat_values"] == []  # blocked: out of the IP statistics too (6.2.4)
    by_ip = (await client.get("/api/admin/subjects?ip=81.2.69.142", headers=admin)).json()
    assert len(by_ip["hits"]) == 3
    assert sorted(r["consent_id"] for r in by_ip["consent_records"]) == ["c-1", "c-9"]
    # Consent records hold only a keyed hash of the IP; the export finds them through it.
    by_hash = (await client.get("/api/admin/subjects?ip=1.1.1.1", headers=admin)).json()
    assert by_hash["hits"] == [] and [r["consent_id"] for r in by_hash["consent_records"]] == [
        "c-9"
    ]
    assert by_ip["ipstat_daily"][0]["ip"] == "81.2.69.142"
    (entry,) = await app.audit.entries(action="subject.export", subject=ALICE)
    assert json.loads(entry["detail"])["hits"] == 2 and entry["outcome"] == "200"


async def test_erasure_deletes_hits_and_per_ip_rows_and_keeps_consent_proof(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str], rollup: DailyRollup
) -> None:
    await _consent_records(app)
    await store(app, hit_row(NOW - 2 * DAY), hit_row(NOW), hit_row(NOW, visitor=BOB))
    async with app.storage.transaction() as tx:
        await rollup(tx, NOW - 5 * DAY, NOW + DAY)
    admin = bearer(tokens["admin"])
    for release in (True, False):  # an old, released block, and an active one
        made = await client.post(
            "/api/admin/blocks", json={"visitor": ALICE, "reason": "check"}, headers=admin
        )
        if release:
            await client.delete(f"/api/admin/blocks/{made.json()['id']}", headers=admin)
    resp = await client.post("/api/admin/subjects/erase", json={"visitor": ALICE}, headers=admin)
    assert resp.status_code == 200, resp.text
    assert resp.json()["hits"] == 2
    # The proof of consent stays, as it is: it holds no raw IP or visitor id.
    assert resp.json()["consent_records_kept"] == 1
    assert resp.json()["consent_records_pseudonymised"] == 0
    assert len(await app.storage.fetch_all("SELECT * FROM consent_records")) == 2
    assert await app.storage.fetch_all("SELECT visitor_id FROM hits") == [{"visitor_id": BOB}]
    assert (NOW - 2 * DAY, NOW + 1) in rollup.calls
    assert await DailyRollup.total(app) == 1
    # Per-IP statistics no longer name Alice, and count only Bob's hit.
    named = await app.storage.fetch_all("SELECT * FROM ipstat_values WHERE visitor = ?", [ALICE])
    assert named == []
    ip_days = await app.storage.fetch_all("SELECT hits FROM ipstat_daily")
    assert ip_days == [{"hits": 1}]
    blocks = await app.storage.fetch_all("SELECT value, released_at FROM blocks ORDER BY id")
    assert blocks[0]["value"].startswith("erased-")  # released: history, pseudonymised
    assert blocks[1] == {"value": ALICE, "released_at": None}  # active: still blocks
    (entry,) = await app.audit.entries(action="subject.erase")
    assert entry["subject"] == ALICE and json.loads(entry["detail"])["hits"] == 2


HOUR = 3_600_000


async def test_a_visitor_is_found_in_every_hour_without_an_index_on_hits(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str]
) -> None:
    # hits has no visitor index (issue 8): export and erasure find a visitor's hits through
    # the hours noted with every insert. The truth they must match is a full scan.
    start = (NOW // DAY - 40) * DAY
    alice_at = [start + 5, start + HOUR + 7, start + 2 * HOUR - 1, start + 9 * DAY, NOW - 1]
    await store(app, *(hit_row(t) for t in alice_at))
    await store(app, *(hit_row(t + 1, visitor=BOB, ip="1.1.1.1") for t in alice_at))
    # A hit that the app's writer did not write, in an hour of its own.
    await store_elsewhere(app, start + 9 * DAY + 5 * HOUR, "9.9.9.9", ALICE)
    scan = await app.storage.fetch_all(
        "SELECT id FROM hits WHERE visitor_id || '' = ? ORDER BY ts_ms, id", [ALICE]
    )
    assert len(scan) == 6
    admin = bearer(tokens["admin"])
    data = (await client.get(f"/api/admin/subjects?visitor={ALICE}", headers=admin)).json()
    assert [h["id"] for h in data["hits"]] == [r["id"] for r in scan]  # all, in time order
    assert [h["ip"] for h in data["hits"]].count("9.9.9.9") == 1
    assert len(data["visitor_hours"]) == 5  # the 2nd and 3rd hits share an hour
    erased = await client.post("/api/admin/subjects/erase", json={"visitor": ALICE}, headers=admin)
    assert erased.json()["hits"] == 6 and erased.json()["span_ms"] == [start + 5, NOW]
    assert await count(app, "SELECT count(*) FROM hits WHERE visitor_id || '' = ?", [ALICE]) == 0
    assert await count(app, "SELECT count(*) FROM hits WHERE visitor_id = ?", [BOB]) == 5
    assert await count(app, "SELECT count(*) FROM visitor_hours WHERE visitor_id = ?", [ALICE]) == 0
    # Bob's hours, four of them shared with Alice's, are all still there.
    assert await count(app, "SELECT count(*) FROM visitor_hours WHERE visitor_id = ?", [BOB]) == 5
    # The visitor comes back in an hour the writer had noted before the erasure: it notes
    # the hour again, and a second erasure finds it.
    await store(app, hit_row(NOW))
    again = await client.post("/api/admin/subjects/erase", json={"visitor": ALICE}, headers=admin)
    assert again.json()["hits"] == 1
    assert await count(app, "SELECT count(*) FROM hits WHERE visitor_id || '' = ?", [ALICE]) == 0


MALLORY = "89.160.20.112"


async def test_an_ip_is_found_in_every_hour_without_an_index_on_hits(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str]
) -> None:
    # hits has no IP index either (issue 8): export, erasure and the engineers' IP lookup
    # find an address's hits through the hours noted with every insert. The truth is a
    # full scan.
    start = (NOW // DAY - 40) * DAY
    at = [start + 5, start + HOUR + 7, start + 2 * HOUR - 1, start + 9 * DAY, NOW - 1]
    await store(app, *(hit_row(t, ip=MALLORY) for t in at))
    await store(app, *(hit_row(t + 1, visitor=BOB, ip="1.1.1.1") for t in at))
    await store(app, hit_row(NOW - 2, visitor=BOB, ip=MALLORY))  # another visitor, same IP
    await store_elsewhere(app, start + 9 * DAY + 5 * HOUR, MALLORY, ALICE)
    scan = await app.storage.fetch_all(
        "SELECT id, ts_ms FROM hits WHERE ip || '' = ? ORDER BY ts_ms, id", [MALLORY]
    )
    assert len(scan) == 7
    # The engineers' lookup pages through every hour, newest first, 2 at a time.
    engineer = bearer(tokens["engineer"])
    listed: list[int] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await client.get(f"/api/ip/{MALLORY}", params=params, headers=engineer)
        assert page.status_code == 200, page.text
        listed += [h["ts_ms"] for h in page.json()["hits"]["items"]]
        cursor = page.json()["hits"]["next_cursor"]
        if cursor is None:
            break
    assert listed == [r["ts_ms"] for r in reversed(scan)]
    admin = bearer(tokens["admin"])
    data = (await client.get(f"/api/admin/subjects?ip={MALLORY}", headers=admin)).json()
    assert [h["id"] for h in data["hits"]] == [r["id"] for r in scan]  # all, in time order
    assert len(data["ip_hours"]) == 5  # the 2nd and 3rd hits share an hour, so do the last two
    erased = await client.post("/api/admin/subjects/erase", json={"ip": MALLORY}, headers=admin)
    assert erased.json()["hits"] == 7 and erased.json()["span_ms"] == [start + 5, NOW]
    assert await count(app, "SELECT count(*) FROM hits WHERE ip || '' = ?", [MALLORY]) == 0
    assert await count(app, "SELECT count(*) FROM hits WHERE ip = ?", ["1.1.1.1"]) == 5
    assert await count(app, "SELECT count(*) FROM ip_hours WHERE ip = ?", [MALLORY]) == 0
    # The address comes back in an hour the writer had noted before the erasure: it notes
    # the hour again, and erasure finds it.
    await store(app, hit_row(NOW, ip=MALLORY))
    again = await client.post("/api/admin/subjects/erase", json={"ip": MALLORY}, headers=admin)
    assert again.json()["hits"] == 1


async def test_an_ips_statistics_are_found_on_every_day_by_their_key(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str]
) -> None:
    # The per-IP tables are keyed by (day, ip) and have no index on the IP: export,
    # erasure and the engineers' IP page read an address's rows day by day
    # (ipstats.by_ip). The truth is a full scan of each table.
    today = NOW // DAY * DAY
    days = [today, today - 3 * DAY, today - 4 * DAY]
    await store(app, *(hit_row(d + 5, ip=MALLORY) for d in days))
    await store(
        app, *(hit_row(d + 6, visitor=BOB, ip="1.1.1.1") for d in [*days, today - 20 * DAY])
    )
    # A request without consent, on a day no other table has (3.3.2 counters).
    unconsented_day = today - 25 * DAY
    await app.storage.write_batch(Batch(unconsented_ips=[(unconsented_day + 7, MALLORY, "")]))

    async def rows_of(ip: str) -> dict[str, list[dict[str, Any]]]:
        return {
            t: await app.storage.fetch_all(f"SELECT * FROM {t} WHERE ip || '' = ?", [ip])
            for t in sorted(ipstats.DAY_KEYED)
        }

    truth = await rows_of(MALLORY)
    assert all(truth.values())
    assert len(truth["ipstat_daily"]) == 3 and len(truth["ipstat_unconsented"]) == 1
    if isinstance(app.storage, SQLiteStorage):  # read by key, not by a scan of the table
        for table in ipstats.DAY_KEYED:
            plan = await app.storage.fetch_all(
                f"EXPLAIN QUERY PLAN SELECT * FROM {table} WHERE {ipstats.by_ip(table)}", [MALLORY]
            )
            assert not [p["detail"] for p in plan if p["detail"].startswith("SCAN " + table)]
    admin = bearer(tokens["admin"])
    data = (await client.get(f"/api/admin/subjects?ip={MALLORY}", headers=admin)).json()
    for table, rows in truth.items():
        assert sorted(map(repr, data[table])) == sorted(map(repr, rows)), table
    page = await client.get(f"/api/ip/{MALLORY}", headers=bearer(tokens["engineer"]))
    listed = [d["date"] for d in page.json()["days"]]
    assert listed == [ipstats.day_of(d) for d in [*days, unconsented_day]]  # newest first
    await client.post("/api/admin/subjects/erase", json={"ip": MALLORY}, headers=admin)
    assert not any((await rows_of(MALLORY)).values())
    other = await rows_of("1.1.1.1")
    assert len(other["ipstat_daily"]) == 4 and other["ipstat_values"]


async def test_erasure_deletes_a_busy_subject_page_by_page(
    app: CollectorApp,
    client: httpx.AsyncClient,
    tokens: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Erasure reads the subject's hours a page at a time and deletes by id; pages of 7
    # over 58 hits, three to a millisecond, so that pages end inside a run of equal times.
    monkeypatch.setattr(subjects, "_DELETE_CHUNK", 7)
    start = NOW - 3 * HOUR
    mine = [hit_row(start + k // 3, ip=MALLORY, consent=f"c-{k % 4}") for k in range(57)]
    mine.append(hit_row(NOW - DAY, ip=MALLORY, consent="c-9"))  # another run of hours
    others = [hit_row(start + k // 3, visitor=BOB, ip="1.1.1.1") for k in range(30)]
    await store(app, *sorted(mine + others, key=lambda h: h.ts_ms))
    admin = bearer(tokens["admin"])
    erased = await client.post("/api/admin/subjects/erase", json={"ip": MALLORY}, headers=admin)
    assert erased.status_code == 200, erased.text
    assert erased.json()["hits"] == 58
    assert erased.json()["span_ms"] == [NOW - DAY, start + 56 // 3 + 1]
    assert await count(app, "SELECT count(*) FROM hits WHERE ip || '' = ?", [MALLORY]) == 0
    assert await count(app, "SELECT count(*) FROM hits WHERE ip = ?", ["1.1.1.1"]) == 30


async def test_blocking_a_network_finds_its_addresses_in_every_hour(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str], rollup: DailyRollup
) -> None:
    await store(
        app,
        hit_row(NOW - 3 * DAY, ip=MALLORY),
        hit_row(NOW - DAY, ip="89.160.20.7"),
        hit_row(NOW, visitor=BOB, ip="1.1.1.1"),
    )
    admin = bearer(tokens["admin"])
    made = await client.post(
        "/api/admin/blocks", json={"network": "89.160.20.0/24", "reason": "farm"}, headers=admin
    )
    assert made.status_code == 201, made.text
    members = await app.storage.fetch_all("SELECT ip FROM block_ips ORDER BY ip")
    assert [r["ip"] for r in members] == ["89.160.20.112", "89.160.20.7"]
    assert (NOW - 3 * DAY, NOW - DAY + 1) in rollup.calls


async def test_blocking_a_visitor_rebuilds_the_span_of_all_its_hours(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str], rollup: DailyRollup
) -> None:
    await store(app, hit_row(NOW - 3 * DAY), hit_row(NOW), hit_row(NOW, visitor=BOB))
    admin = bearer(tokens["admin"])
    made = await client.post(
        "/api/admin/blocks", json={"visitor": ALICE, "reason": "check"}, headers=admin
    )
    assert made.status_code == 201, made.text
    assert (NOW - 3 * DAY, NOW + 1) in rollup.calls


async def test_retention_forgets_the_hours_of_purged_hits_only(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str]
) -> None:
    await store(app, hit_row(NOW - 400 * DAY), hit_row(NOW - DAY), hit_row(NOW - 400 * DAY, BOB))
    done = await client.post("/api/admin/retention/run", headers=bearer(tokens["admin"]))
    assert done.json()["rows"] == 2
    hours = await app.storage.fetch_all("SELECT visitor_id, hour FROM visitor_hours")
    assert hours == [{"visitor_id": ALICE, "hour": (NOW - DAY) // HOUR}]
    ip_hours = await app.storage.fetch_all("SELECT ip, hour FROM ip_hours")
    assert ip_hours == [{"ip": "81.2.69.142", "hour": (NOW - DAY) // HOUR}]


async def visitor_hours_key(app: CollectorApp) -> list[str]:
    """The columns of visitor_hours' primary key, in order."""
    if isinstance(app.storage, SQLiteStorage):
        rows = await app.storage.fetch_all(
            "SELECT name FROM pragma_table_info('visitor_hours') WHERE pk > 0 ORDER BY pk"
        )
        return [r["name"] for r in rows]
    rows = await app.storage.fetch_all(
        "SELECT a.attname AS name FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(n, o) "
        "JOIN pg_attribute a ON a.attrelid = 'visitor_hours'::regclass AND a.attnum = k.n "
        "WHERE i.indrelid = 'visitor_hours'::regclass AND i.indisprimary ORDER BY k.o"
    )
    return [r["name"] for r in rows]


async def test_visitor_hours_are_keyed_by_hour_and_read_by_key(app: CollectorApp) -> None:
    # By hour first, the writer adds each new visitor's row at the table's newest end
    # (migration 0017; docs/PERFORMANCE.md, session 14). A visitor's rows are then found
    # a stored hour at a time: a lookup that scanned the table instead would still find
    # them, only slower, so the plan is what is checked.
    assert await visitor_hours_key(app) == ["hour", "visitor_id"]
    if isinstance(app.storage, SQLiteStorage):
        clause = subject_hours.rows_of("visitor")
        for sql in (f"SELECT * FROM visitor_hours WHERE {clause}",
                    f"DELETE FROM visitor_hours WHERE {clause}"):  # fmt: skip
            plan = await app.storage.fetch_all(f"EXPLAIN QUERY PLAN {sql}", [ALICE])
            details = [p["detail"] for p in plan]
            assert "SEARCH visitor_hours USING PRIMARY KEY (hour=? AND visitor_id=?)" in details
            assert not [d for d in details if d.startswith("SCAN visitor_hours")], details


async def test_upgrading_a_store_notes_the_hours_of_the_hits_it_holds(
    backend_settings: Settings,
) -> None:
    # A store from before migrations 0013 and 0014: visitor and IP indexes, no hours
    # tables, hits already held. (SQLite's 0016 dropped the triggers of 0013 and 0014;
    # 0017 keys visitor_hours by hour first, and must keep every row 0013 noted.)
    downgrade = {
        "sqlite": [
            "DROP TABLE visitor_hours",
            "CREATE INDEX hits_visitor ON hits (visitor_id, ts_ms)",
            "DROP TABLE ip_hours",
            "CREATE INDEX hits_ip ON hits (ip, ts_ms)",
        ],
        "postgres": [
            "DROP TRIGGER hits_visitor_hours ON hits",
            "DROP FUNCTION note_visitor_hours",
            "DROP TABLE visitor_hours",
            "CREATE INDEX hits_visitor ON hits (visitor_id, ts_ms)",
            "DROP TRIGGER hits_ip_hours ON hits",
            "DROP FUNCTION note_ip_hours",
            "DROP TABLE ip_hours",
            "CREATE INDEX hits_ip ON hits (ip, ts_ms)",
        ],
    }[backend_settings.storage.backend]
    app = create_app(backend_settings)
    async with app.lifespan(app.starlette):
        await store(app, hit_row(NOW - 2 * DAY), hit_row(NOW), hit_row(NOW, visitor=BOB))
        for sql in [*downgrade, "DELETE FROM schema_version WHERE version IN (13, 14, 16, 17)"]:
            await app.storage.execute(sql)
    app = create_app(backend_settings)
    async with app.lifespan(app.starlette):
        assert await visitor_hours_key(app) == ["hour", "visitor_id"]  # 0017 ran again
        hours = await app.storage.fetch_all(
            "SELECT visitor_id, hour FROM visitor_hours ORDER BY visitor_id, hour"
        )
        assert [(r["visitor_id"], r["hour"]) for r in hours] == [
            (ALICE, (NOW - 2 * DAY) // HOUR),
            (ALICE, NOW // HOUR),
            (BOB, NOW // HOUR),
        ]
        ip_hours = await app.storage.fetch_all("SELECT ip, hour FROM ip_hours ORDER BY hour")
        assert [(r["ip"], r["hour"]) for r in ip_hours] == [
            ("81.2.69.142", (NOW - 2 * DAY) // HOUR),
            ("81.2.69.142", NOW // HOUR),
        ]
        admin = bearer(await app.tokens.create("root", "admin"))
        async with client_for(app) as client:
            erased = await client.post(
                "/api/admin/subjects/erase", json={"visitor": ALICE}, headers=admin
            )
            assert erased.json()["hits"] == 2
            by_ip = await client.post(
                "/api/admin/subjects/erase", json={"ip": "81.2.69.142"}, headers=admin
            )
            assert by_ip.json()["hits"] == 1  # Bob's


async def test_breach_report_lists_the_visitors_to_inform(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str]
) -> None:
    t = 1_700_000_000_000  # 2023-11-14T22:13:20Z
    await store(
        app,
        hit_row(t, ALICE, "81.2.69.142", "c-1"),
        hit_row(t + 1000, ALICE, "81.2.69.143", "c-2"),
        hit_row(t, BOB, "10.0.0.1", "c-9"),
        hit_row(t + 10 * DAY, "c" * 32, "81.2.69.1", "c-5"),  # outside the window
    )
    admin = bearer(tokens["admin"])
    url = "/api/admin/incident?from=2023-11-14&to=2023-11-15"
    report = (await client.get(url, headers=admin)).json()
    assert [s["visitor_id"] for s in report["subjects"]] == [ALICE, BOB]
    assert report["consent_ids"] == ["c-1", "c-2", "c-9"]
    assert report["subjects"][0]["ips"] == ["81.2.69.142", "81.2.69.143"]
    ranged = (await client.get(url + "&ip_range=81.2.69.0/24", headers=admin)).json()
    assert [s["visitor_id"] for s in ranged["subjects"]] == [ALICE] and ranged["hits"] == 2
    bad = await client.get(url + "&ip_range=nonsense", headers=admin)
    assert bad.status_code == 400 and "ip-range" in bad.json()["detail"]
    entries = await app.audit.entries(action="incident.report")
    assert [e["outcome"] for e in entries] == ["400", "200", "200"]
    assert json.loads(entries[1]["detail"])["ip_range"] == "81.2.69.0/24"


async def test_retention_deletes_old_hits_and_keeps_aggregates(
    app: CollectorApp, client: httpx.AsyncClient, tokens: dict[str, str], rollup: DailyRollup
) -> None:
    await store(app, *(hit_row(NOW - 400 * DAY - i) for i in range(7)), hit_row(NOW - DAY))
    await client.get("/p.gif")  # one anonymous counter row
    await app.writer.flush()
    async with app.storage.transaction() as tx:
        await rollup(tx, NOW - 500 * DAY, NOW + DAY)
    counts_before = await app.storage.fetch_all("SELECT * FROM pixel_counts")
    admin = bearer(tokens["admin"])
    plan = (await client.get("/api/admin/retention", headers=admin)).json()
    assert plan["days"] == 365 and plan["pending"] == 7  # default: consent.period_days
    done = await client.post("/api/admin/retention/run", headers=admin)
    assert done.json() == {"rows": 7, "consent_records": 0}
    assert await count(app, "SELECT count(*) AS n FROM hits") == 1
    assert await DailyRollup.total(app) == 8  # rollups stay
    assert await app.storage.fetch_all("SELECT * FROM pixel_counts") == counts_before
    (run,) = await app.audit.entries(action="retention.run")
    assert run["actor"] == "system" and json.loads(run["detail"])["rows"] == 7


async def test_depersonalising_retention_keeps_coarse_rows(settings: Settings) -> None:
    settings = dataclasses.replace(
        settings,
        retention=dataclasses.replace(
            settings.retention, days=30, mode="depersonalise", chunk_size=2
        ),
    )
    app = create_app(settings)
    async with app.lifespan(app.starlette):
        await store(
            app,
            hit_row(NOW - 40 * DAY, ip="81.2.69.142"),
            hit_row(NOW - 40 * DAY, ip="2001:db8:1:2::7"),
            hit_row(NOW - 31 * DAY, ip="10.1.2.3"),
            hit_row(NOW - DAY),
        )
        assert await app.governance.apply_retention() == 3
        assert await app.governance.apply_retention() == 0  # done once, not again
        old = await app.storage.fetch_all(
            "SELECT ip, visitor_id, session_id, consent_id, user_agent, cookies, browser_family, "
            "city FROM hits WHERE ts_ms < ? ORDER BY ip",
            [NOW - 30 * DAY],
        )
    assert [r["ip"] for r in old] == ["10.1.2.0", "2001:db8:1::", "81.2.69.0"]
    for r in old:
        assert r["visitor_id"] == r["session_id"] == r["consent_id"] == r["user_agent"] == ""
        assert r["cookies"] is None
        assert r["browser_family"] == "Mobile Safari" and r["city"] == "London"


async def test_server_applies_retention_periodically(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, retention={"interval_minutes": 0.001})
    app = create_app(settings)
    async with app.lifespan(app.starlette):
        await store(app, hit_row(NOW - 400 * DAY))
        deadline = time.monotonic() + 5
        # The run is audited once it is over, after its deletes have committed (and the
        # checkpoint that follows them), so wait for both.
        while time.monotonic() < deadline and (
            await count(app, "SELECT count(*) AS n FROM hits")
            or not await app.audit.entries(action="retention.run")
        ):
            await asyncio.sleep(0.02)
        assert await count(app, "SELECT count(*) AS n FROM hits") == 0
        assert await app.audit.entries(action="retention.run")


async def test_secrets_and_tokens_never_reach_logs_and_private_files_are_0600(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # No configured secret: one is generated into a 0600 file beside the database.
    settings = make_settings(tmp_path, consent={"secret": ""})
    app = create_app(settings)
    generated = app.settings.consent.secret
    async with app.lifespan(app.starlette), client_for(app) as client:
        token = await app.tokens.create("root", "admin")
        for body in ({"ip": "1.2.3.4", "reason": "r"}, {"visitor": ALICE, "reason": "r"}):
            made = await client.post("/api/admin/blocks", json=body, headers=bearer(token))
            assert made.status_code == 201
        await client.get("/api/audit", headers=bearer("kdv_guessed-token"))
        await client.get("/p.gif", headers={"cookie": f"kdv_consent={consent_value(app)}"})
        await app.writer.flush()
        for name in ("collector.db", "collector.db-wal", "collector.db-shm",
                     "collector.db.secret", "collector.db.lock"):  # fmt: skip
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        details = " ".join(e["detail"] or "" for e in await app.audit.entries(limit=1000))
    assert (tmp_path / "collector.db.secret").read_text().strip() == generated
    for text in (caplog.text, details):
        assert generated not in text and token not in text and "kdv_guessed" not in text
    assert '"secret": "***"' in details  # the start record shows the config, redacted


async def test_purge_works_in_short_chunks_and_reports_progress(app: CollectorApp) -> None:
    await store(app, *(hit_row(NOW - 400 * DAY + i) for i in range(7)), hit_row(NOW))
    plan = await retention.plan(app.storage, app.settings)
    steps: list[int] = []
    assert await retention.purge(app.storage, plan, 3, steps.append) == 7
    # SQLite deletes in chunks; PostgreSQL drops the old day's partition at once.
    assert steps == ([3, 3, 1] if app.settings.storage.backend == "sqlite" else [7])
    assert await count(app, "SELECT count(*) AS n FROM hits") == 1


class PartitionedSQLite(SQLiteStorage):
    """A backend with the partition hook, as PostgreSQL has: whole days go at once."""

    dropped: list[int]

    async def drop_partitions_before(self, ts_ms: int) -> int:
        self.dropped = [ts_ms]
        whole_days = ts_ms // DAY * DAY
        return 1 if await self.execute("DELETE FROM hits WHERE ts_ms < ?", [whole_days]) else 0


async def test_purge_lets_a_partitioned_backend_drop_whole_days_first(settings: Settings) -> None:
    storage = PartitionedSQLite(settings)
    await storage.open()
    try:
        cutoff = (NOW // DAY - 10) * DAY + DAY // 2  # the middle of a day
        await storage.write_batch(
            Batch(hits=[hit_row(cutoff - 3 * DAY), hit_row(cutoff - 1), hit_row(cutoff)])
        )
        plan = retention.Plan(cutoff, 10, "delete", 2)
        steps: list[int] = []
        assert await retention.purge(storage, plan, 100, steps.append) == 2
        assert storage.dropped == [cutoff] and steps == [1, 1]  # a partition, then the rest
        assert await storage.fetch_all("SELECT ts_ms FROM hits") == [{"ts_ms": cutoff}]
    finally:
        await storage.close()


def test_every_test_named_in_privacy_doc_exists() -> None:
    """docs/PRIVACY.md is the officer's evidence; a renamed test must not leave it stale."""
    root = Path(__file__).resolve().parent
    named = re.findall(
        r"`(test_\w+\.py)::(test_\w+)`", (root.parent / "docs/PRIVACY.md").read_text()
    )
    assert len(named) > 20
    for file, function in named:
        source = (root / file).read_text()
        assert re.search(rf"^(async )?def {function}\(", source, re.M), f"{file}::{function}"


async def test_governance_operations_run_on_every_backend(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    """Blocking, export, breach report, erasure and retention with portable SQL (SQLite and
    PostgreSQL, where retention drops whole day partitions first)."""
    app, client = backend_app, backend_client
    admin = bearer(await app.tokens.create("root", "admin"))
    await store(
        app, hit_row(NOW - 400 * DAY), hit_row(NOW), hit_row(NOW, visitor=BOB, ip="1.1.1.1")
    )
    made = await client.post(
        "/api/admin/blocks", json={"visitor": ALICE, "reason": "check"}, headers=admin
    )
    assert made.status_code == 201, made.text
    assert await count(app, f"SELECT count(*) AS n FROM hits WHERE {VISIBLE}") == 1
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW / 1000))
    report = await client.get(f"/api/admin/incident?from={day}&to=2100-01-01", headers=admin)
    assert [s["visitor_id"] for s in report.json()["subjects"]] == [ALICE, BOB]
    exported = await client.get(f"/api/admin/subjects?visitor={ALICE}", headers=admin)
    assert len(exported.json()["hits"]) == 2
    assert (await client.delete(f"/api/admin/blocks/{made.json()['id']}", headers=admin)).is_success
    ran = await client.post("/api/admin/retention/run", headers=admin)
    assert ran.json() == {"rows": 1, "consent_records": 0}
    erased = await client.post("/api/admin/subjects/erase", json={"ip": "1.1.1.1"}, headers=admin)
    assert erased.json()["hits"] == 1
    assert await app.storage.fetch_all("SELECT visitor_id FROM hits") == [{"visitor_id": ALICE}]
    assert (await app.audit.verify()).ok
