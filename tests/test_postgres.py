"""What only PostgreSQL does: day partitions, several nodes migrating and writing at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from collector.app import create_app
from collector.config import Settings
from collector.storage import drop_partitions_before, open_storage
from collector.storage.base import Batch, Storage
from collector.storage.pg_partitions import DAY_MS
from collector.storage.postgres import to_dollar
from tests.conftest import make_settings
from tests.test_storage import sample_row

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_settings(tmp_path: Path, pg_dsn: str) -> Settings:
    return make_settings(
        tmp_path,
        storage={
            "backend": "postgres",
            "dsn": pg_dsn,
            "spool_dir": str(tmp_path / "spool"),
            "partition_days_ahead": 2,
        },
    )


async def opened(settings: Settings) -> Storage:
    storage = open_storage(settings)
    await storage.open()
    return storage


def test_placeholders_become_numbered_outside_quotes_only() -> None:
    assert to_dollar("SELECT ? , '?', \"a?\" WHERE x = ? AND y IN (?, ?)") == (
        "SELECT $1 , '?', \"a?\" WHERE x = $2 AND y IN ($3, $4)"
    )


async def partitions(storage: Storage) -> list[str]:
    found = await storage.fetch_all(
        "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'hits'::regclass ORDER BY 1"
    )
    return [r["name"] for r in found]


async def test_hits_go_to_day_partitions_made_ahead_and_on_demand(pg_settings: Settings) -> None:
    storage = await opened(pg_settings)
    try:
        today = int(time.time() * 1000) // DAY_MS
        ahead = await partitions(storage)
        assert len(ahead) == 4  # yesterday, today and two days ahead
        old = (today - 40) * DAY_MS + 5
        await storage.write_batch(Batch(hits=[sample_row(ts_ms=old), sample_row(ts_ms=old + 1)]))
        await storage.write_batch(Batch(hits=[sample_row(ts_ms=today * DAY_MS + 7)]))
        names = await partitions(storage)
        assert len(names) == 5 and names[0] == time.strftime(
            "hits_p%Y%m%d", time.gmtime(old / 1000)
        )
        # Retention drops whole days before the cut-off and leaves the rest
        assert await drop_partitions_before(storage, (today - 1) * DAY_MS) == 1
        assert await storage.fetch_all("SELECT ts_ms FROM hits") == [{"ts_ms": today * DAY_MS + 7}]
        # a batch for the dropped day still lands (the partition is made again)
        await storage.write_batch(Batch(hits=[sample_row(ts_ms=old)]))
        assert len(await storage.fetch_all("SELECT id FROM hits")) == 2
    finally:
        await storage.close()


async def test_nodes_starting_together_migrate_once(pg_settings: Settings) -> None:
    nodes = [open_storage(pg_settings) for _ in range(4)]
    await asyncio.gather(*(n.open() for n in nodes))
    try:
        versions = await nodes[0].fetch_all("SELECT version FROM schema_version")
        assert len(versions) == len({r["version"] for r in versions}) >= 3
    finally:
        for n in nodes:
            await n.close()


async def test_counts_stay_exact_when_nodes_upsert_the_same_keys(pg_settings: Settings) -> None:
    nodes = [await opened(pg_settings) for _ in range(3)]
    keys = [("2026-01-01", f"/p{i}", "absent") for i in range(20)]
    try:

        async def node_writes(node: Storage, reverse: bool) -> None:
            for _ in range(10):
                order = list(reversed(keys)) if reverse else keys
                await node.write_batch(Batch(pixel_counts={k: 1 for k in order}))

        await asyncio.gather(*(node_writes(n, i % 2 == 1) for i, n in enumerate(nodes)))
        counts = await nodes[0].fetch_all("SELECT hits FROM pixel_counts")
        assert len(counts) == 20 and {r["hits"] for r in counts} == {30}
    finally:
        for n in nodes:
            await n.close()


async def test_audit_chain_stays_one_chain_across_nodes(pg_settings: Settings) -> None:
    apps = [create_app(pg_settings) for _ in range(2)]
    for a in apps:
        await a.storage.open()
    try:
        await asyncio.gather(
            *(a.audit.record(actor=f"node{i}", action="x") for i, a in enumerate(apps * 15))
        )
        result = await apps[1].audit.verify()
        assert result.ok and result.checked == 30
    finally:
        for a in apps:
            await a.storage.close()
