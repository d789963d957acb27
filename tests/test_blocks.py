"""Blocking (6.2.4) of IP networks, and blocks that end by themselves (``expires_at``).

Through the real app on SQLite and on PostgreSQL: a network block drops new hits from
every address inside it at write time and hides and un-aggregates the stored ones; an
end passes and the block stops applying without anyone acting, is released by the
server (audited, rollups rebuilt) and listed as expired.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from collector import blocking
from collector.app import CollectorApp
from collector.blocking import Target
from collector.cli import main
from collector.errors import InputError, Unprocessable
from collector.visibility import VISIBLE
from tests.conftest import SECRET, client_for, consent_value
from tests.test_governance import (
    ALICE,
    BOB,
    DAY,
    NOW,
    DailyRollup,
    bearer,
    count,
    hit_row,
    store,
)


@pytest.fixture
async def app(backend_app: CollectorApp) -> CollectorApp:
    return backend_app


@pytest.fixture
async def rollup(app: CollectorApp) -> DailyRollup:
    await app.storage.execute("CREATE TABLE daily (day INTEGER PRIMARY KEY, hits INTEGER)")
    found = DailyRollup()
    app.governance.rebuilders.append(found)
    app.governance.settle_s = 0.05
    return found


@pytest.fixture
async def admin(app: CollectorApp) -> dict[str, str]:
    return bearer(await app.tokens.create("dpo", "admin"))


async def visible_ips(app: CollectorApp) -> list[str]:
    found = await app.storage.fetch_all(f"SELECT ip FROM hits WHERE {VISIBLE} ORDER BY ip")
    return [r["ip"] for r in found]


async def pixel_from(app: CollectorApp, ip: str, visitor: str = BOB) -> None:
    async with client_for(app, ip) as c:
        cookie = f"kdv_consent={consent_value(app)}; kdv_vid={visitor}"
        assert (await c.get("/p.gif", headers={"cookie": cookie})).status_code == 200


async def until(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


INSIDE_V4, OUTSIDE_V4 = "203.0.113.5", "203.0.114.5"
INSIDE_V6, OUTSIDE_V6 = "2001:db8:1::5", "2001:db8:2::5"


async def test_network_block_drops_and_hides_every_address_inside_and_nothing_else(
    app: CollectorApp, client: httpx.AsyncClient, admin: dict[str, str], rollup: DailyRollup
) -> None:
    await store(
        app,
        hit_row(NOW - 2 * DAY, ip=INSIDE_V4),
        hit_row(NOW - DAY, ip="203.0.113.250"),
        hit_row(NOW - DAY, ip=OUTSIDE_V4),
        hit_row(NOW, ip=INSIDE_V6),
        hit_row(NOW, ip=OUTSIDE_V6),
    )
    async with app.storage.transaction() as tx:
        await rollup(tx, NOW - 5 * DAY, NOW + DAY)
    assert await DailyRollup.total(app) == 5

    v4 = await client.post(
        "/api/admin/blocks",
        json={"network": "203.0.113.77/24", "reason": "fraud check #4"},
        headers=admin,
    )
    assert v4.status_code == 201, v4.text
    assert (v4.json()["kind"], v4.json()["value"]) == ("network", "203.0.113.0/24")  # normalised
    assert v4.json()["span_ms"] == [NOW - 2 * DAY, NOW - DAY + 1]
    v6 = await client.post(
        "/api/admin/blocks",
        json={"network": "2001:DB8:1::/48", "reason": "fraud check #4"},
        headers=admin,
    )
    assert v6.json()["value"] == "2001:db8:1::/48"
    # Stored hits inside the networks: hidden from views and out of the rollups.
    assert await visible_ips(app) == [OUTSIDE_V6, OUTSIDE_V4]
    assert await DailyRollup.total(app) == 2
    # Each block rebuilds its days again once every process has seen it (settle_later).
    # Let those runs finish first: one that ran after the new hits below would count
    # today's new hit in the stand-in rollup, and the totals would depend on timing.
    await app.governance.settled()
    # New hits from inside: dropped at write; from next door: recorded.
    for ip in (INSIDE_V4, "203.0.113.9", INSIDE_V6, "2001:db8:1:ffff::1", OUTSIDE_V4):
        await pixel_from(app, ip)
    await app.writer.flush()
    assert await count(app, "SELECT count(*) AS n FROM hits") == 6
    assert await count(app, "SELECT count(*) AS n FROM hits WHERE ip = ?", [OUTSIDE_V4]) == 2
    metrics = (await client.get("/metrics")).text
    assert 'collector_hits_dropped_total{reason="blocked"} 4.0' in metrics
    # One address under two blocks: the network and an exact one.
    assert (
        await client.post(
            "/api/admin/blocks", json={"ip": INSIDE_V4, "reason": "also"}, headers=admin
        )
    ).status_code == 201

    released = await client.delete(f"/api/admin/blocks/{v4.json()['id']}", headers=admin)
    assert released.status_code == 200 and released.json()["state"] == "released"
    assert await visible_ips(app) == [OUTSIDE_V6, "203.0.113.250", OUTSIDE_V4, OUTSIDE_V4]
    # The released network's days are rebuilt: 203.0.113.250 counts again, 203.0.113.5
    # stays out under its own block (the stand-in rollup is not kept on write).
    assert await DailyRollup.total(app) == 3
    # The stored addresses were only needed while the block was in force.
    assert (
        await count(
            app, "SELECT count(*) AS n FROM block_ips WHERE block_id = ?", [v4.json()["id"]]
        )
        == 0
    )

    audit = [e for e in await app.audit.entries(limit=100) if e["action"] == "block.add"]
    assert {e["subject"] for e in audit} == {"203.0.113.0/24", "2001:db8:1::/48", INSIDE_V4}
    assert {json.loads(e["detail"])["kind"] for e in audit} == {"network", "ip"}
    assert (await app.audit.verify()).ok


async def test_hits_stored_in_the_refresh_window_are_hidden_once_every_process_has_seen_it(
    app: CollectorApp, client: httpx.AsyncClient, admin: dict[str, str], rollup: DailyRollup
) -> None:
    """Another process that has not refreshed yet may store a hit from a new address in
    the network; the settle step records that address too and rebuilds the rollups."""
    made = await client.post(
        "/api/admin/blocks", json={"network": "198.51.100.0/24", "reason": "r"}, headers=admin
    )
    assert made.status_code == 201
    await store(app, hit_row(NOW, ip="198.51.100.7"))  # as a stale worker would
    await until(lambda: _hidden(app, "198.51.100.7"))
    assert await DailyRollup.total(app) == 0


async def _hidden(app: CollectorApp, ip: str) -> bool:
    return ip not in await visible_ips(app)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"network": "10.0.0.0/8", "reason": "x"}, 422, "wider than a /16 (IPv4)"),
        ({"network": "2001:db8::/24", "reason": "x"}, 422, "wider than a /32 (IPv6)"),
        ({"network": "10.0.0.0/33", "reason": "x"}, 400, "network: not an IP network"),
        ({"network": "203.0.113.0/24", "ip": "1.2.3.4", "reason": "x"}, 400, "exactly one"),
        ({"network": "203.0.113.0/24", "reason": "x", "force": "yes"}, 400, "force: expected"),
        ({"visitor": ALICE, "reason": "x", "expires_at": "2001-01-01T00:00:00Z"}, 422, "future"),
        ({"visitor": ALICE, "reason": "x", "for": "30d", "expires_at": NOW + DAY}, 400, "not both"),
        ({"visitor": ALICE, "reason": "x", "for": "soon"}, 400, "for: expected a duration"),
        ({"visitor": ALICE, "reason": "x", "expires_at": "tomorrow"}, 400, "expires_at: expected"),
    ],
)
async def test_bad_network_or_expiry_says_what_is_wrong(
    app: CollectorApp,
    client: httpx.AsyncClient,
    admin: dict[str, str],
    body: dict[str, Any],
    status: int,
    message: str,
) -> None:
    resp = await client.post("/api/admin/blocks", json=body, headers=admin)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"]
    assert await count(app, "SELECT count(*) AS n FROM blocks") == 0


async def test_a_wide_network_needs_force_and_the_audit_says_it_was_forced(
    app: CollectorApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    made = await client.post(
        "/api/admin/blocks",
        json={"network": "10.0.0.0/8", "reason": "botnet", "force": True},
        headers=admin,
    )
    assert made.status_code == 201, made.text
    await pixel_from(app, "10.200.3.4")
    await app.writer.flush()
    assert await count(app, "SELECT count(*) AS n FROM hits") == 0
    entry = next(e for e in await app.audit.entries(limit=10) if e["action"] == "block.add")
    detail = json.loads(entry["detail"])
    assert (detail["kind"], detail["force"], detail["expires_at"]) == ("network", True, None)


def test_targets_are_validated_and_normalised() -> None:
    assert Target.parse(network="203.0.113.7/24") == Target("network", "203.0.113.0/24")
    assert Target.parse(network="::ffff:203.0.113.0/120") == Target("network", "203.0.113.0/24")
    assert Target.parse(network="203.0.113.7/32") == Target("ip", "203.0.113.7")
    assert Target.parse(network="2001:db8::1/128") == Target("ip", "2001:db8::1")
    assert Target.parse(network="0.0.0.0/0", force=True).value == "0.0.0.0/0"
    assert Target.parse(ip="::ffff:1.2.3.4") == Target("ip", "1.2.3.4")
    with pytest.raises(Unprocessable):
        Target.parse(network="203.0.0.0/15")
    assert Target.parse(network="203.0.0.0/16").kind == "network"
    assert blocking.parse_duration("30d") == 30 * DAY
    assert blocking.parse_duration("2w") == 14 * DAY
    assert blocking.parse_duration("90m") == 90 * 60_000
    assert blocking.parse_expiry(None, "1h", now_ms=1000) == 1000 + 3_600_000
    assert blocking.parse_expiry("2100-01-01", None) == 4_102_444_800_000
    assert blocking.parse_expiry(None, None) is None
    with pytest.raises(InputError):
        blocking.parse_duration("0d")


async def test_a_block_ends_by_itself_is_released_audited_and_listed_as_expired(
    app: CollectorApp, client: httpx.AsyncClient, admin: dict[str, str], rollup: DailyRollup
) -> None:
    await store(app, hit_row(NOW - DAY), hit_row(NOW - DAY, visitor=BOB, ip=OUTSIDE_V4))
    ends = int(time.time() * 1000) + 1500
    made = await client.post(
        "/api/admin/blocks",
        json={"visitor": ALICE, "reason": "check until the reply", "expires_at": ends},
        headers=admin,
    )
    assert made.status_code == 201, made.text
    block = made.json()
    assert (block["expires_at"], block["state"]) == (ends, "active")
    assert await DailyRollup.total(app) == 1
    await pixel_from(app, "81.2.69.142", ALICE)
    await app.writer.flush()
    assert await count(app, "SELECT count(*) AS n FROM hits WHERE visitor_id = ?", [ALICE]) == 1

    # The end passes: nothing is done by anyone, and the block no longer applies.
    await asyncio.sleep(max(0.0, ends / 1000 - time.time()) + 0.05)
    assert await count(app, f"SELECT count(*) AS n FROM hits WHERE {VISIBLE}") == 2
    await pixel_from(app, "81.2.69.142", ALICE)
    await app.writer.flush()
    assert await count(app, "SELECT count(*) AS n FROM hits WHERE visitor_id = ?", [ALICE]) == 2
    # The server releases it within a refresh: audited once, rollups rebuilt.
    await until(lambda: _expired_in_audit(app))
    row = await app.storage.fetch_one("SELECT * FROM blocks WHERE id = ?", [block["id"]])
    assert row is not None
    assert (row["released_at"], row["released_by"]) == (ends, "expiry")
    day = (NOW - DAY) // DAY
    assert await count(app, "SELECT hits FROM daily WHERE day = ?", [day]) == 2  # Alice's back
    listed = (await client.get("/api/admin/blocks", headers=admin)).json()
    assert listed["count"] == 0
    everything = (await client.get("/api/admin/blocks?all=1", headers=admin)).json()
    assert [b["state"] for b in everything["items"]] == ["expired"]
    gone = await client.delete(f"/api/admin/blocks/{block['id']}", headers=admin)
    assert gone.status_code == 404
    # A second sweep (another worker, the CLI) finds nothing left to release.
    assert await blocking.expire_due(app.storage, app.governance.rebuilders, app.audit) == []
    expiries = [e for e in await app.audit.entries(limit=100) if e["action"] == "block.expire"]
    assert len(expiries) == 1 and expiries[0]["actor"] == "system"
    assert expiries[0]["subject"] == ALICE
    assert (await app.audit.verify()).ok


async def _expired_in_audit(app: CollectorApp) -> bool:
    return any(e["action"] == "block.expire" for e in await app.audit.entries(limit=100))


async def test_the_writer_filter_applies_an_end_to_the_millisecond(app: CollectorApp) -> None:
    """Between two refreshes the in-memory list still drops hits until the end, not after."""
    blocklist = app.governance.blocklist
    ends = int(time.time() * 1000) + 300
    await blocking.add(
        app.storage, Target.parse(network="192.0.2.0/24"), "r", "t", [], expires_at=ends
    )
    await blocklist.refresh()
    row = hit_row(NOW, ip="192.0.2.1")
    assert blocklist.keep([row]) == []
    await asyncio.sleep(max(0.0, ends / 1000 - time.time()) + 0.01)
    assert blocklist.keep([row]) == [row]


def test_cli_blocks_a_network_for_a_while_and_lists_it_expired(tmp_path: Path) -> None:
    env = {"COLLECTOR_STORAGE_PATH": str(tmp_path / "c.db"), "COLLECTOR_CONSENT_SECRET": SECRET}
    runner = CliRunner()
    wide = runner.invoke(main, ["block", "--network", "10.0.0.0/8", "--reason", "x"], env=env)
    assert wide.exit_code == 2 and "wider than a /16" in wide.stderr
    start = time.monotonic()  # `block` waits a second for running servers (settle)
    made = runner.invoke(
        main,
        ["block", "--network", "203.0.113.9/24", "--reason", "check", "--for", "2s"],
        env=env,
    )
    assert made.exit_code == 0, made.output
    assert "blocked network 203.0.113.0/24 (block 1) until" in made.stdout
    listed = runner.invoke(main, ["blocks"], env=env)
    assert "203.0.113.0/24" in listed.stdout and "active until" in listed.stdout
    time.sleep(max(0.0, start + 2.1 - time.monotonic()))
    assert "203.0.113.0/24" not in runner.invoke(main, ["blocks"], env=env).stdout
    everything = runner.invoke(main, ["blocks", "--all"], env=env).stdout
    assert "expired" in everything
    audit = runner.invoke(main, ["audit", "list"], env=env).stdout
    assert "block.expire" in audit and "block.add" in audit
    past = runner.invoke(
        main, ["block", "--ip", "1.2.3.4", "--reason", "x", "--until", "2001-01-01"], env=env
    )
    assert past.exit_code == 2 and "--until: must be in the future" in past.stderr
