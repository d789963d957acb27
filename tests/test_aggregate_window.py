"""The writer process sums the aggregates of several batches before it writes them.

Rollups and IP statistics of consecutive batches may wait in memory (``Batch.hold``) and
be written together (``SQLiteStorage.write_batch``). These tests hold that to what the
analysts and the DPO rely on: the aggregates come out exactly as if every batch had
written its own, they lag the hits by the window's maximum age at most (half a second
when nothing follows), a crash with a window open loses
none of them, and a rebuild or an erasure meanwhile neither counts a hit twice nor
brings an erased subject back.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from collector import ipstats, rollups
from collector.aggregates import aggregators, rebuilders
from collector.config import Settings
from collector.storage import open_storage
from collector.storage import sqlite as sqlite_storage
from collector.storage.base import Batch, HitRow, Storage
from collector.subjects import Subject, erase
from tests.conftest import SECRET, make_settings, rows

AGGREGATES = (
    "rollup_hits",
    "rollup_hll",
    "rollup_month",
    "rollup_hll_month",
    "ipstat_daily",
    "ipstat_minute",
    "ipstat_values",
    "pixel_counts",
)
ERASED = f"{7:032x}"


def make_hits(n: int, seed: int, start_ms: int) -> list[HitRow]:
    """Hits from 40 visitors on 30 addresses and 25 pages, 50 ms apart."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        bot = rnd.random() < 0.1
        out.append(
            HitRow(
                ts_ms=start_ms + i * 50,
                ip=f"198.51.100.{rnd.randrange(30)}",
                visitor_id=f"{rnd.randrange(40):032x}",
                session_id="s" * 32,
                cookies=None,
                user_agent=f"agent-{rnd.randrange(5)}",
                browser_family="Googlebot" if bot else rnd.choice(["Chrome", "Firefox", "Safari"]),
                browser_version="1",
                os_family=rnd.choice(["Linux", "Windows", "iOS"]),
                os_version="",
                device_family="Other",
                device_brand="",
                device_class="bot" if bot else rnd.choice(["pc", "mobile"]),
                page_url=None
                if rnd.random() < 0.1
                else f"https://shop.example/p{rnd.randrange(25)}",
                referrer_url=rnd.choice([None, "https://search.example/q"]),
                placement_id=None,
                country=rnd.choice([None, "KZ", "DE"]),
                region=None,
                city=None,
                consent_id="c" * 16,
                policy_version="1",
                source="web",
            )
        )
    return out


def batches(start_ms: int, count: int = 6, size: int = 300) -> list[Batch]:
    """``count`` batches that all allow holding except the last (nobody waits on them)."""
    found = []
    for k in range(count):
        hits = make_hits(size, seed=k, start_ms=start_ms + k * size * 50)
        counts = {("2026-12-06", "/", "granted"): size}
        found.append(Batch(hits=hits, pixel_counts=counts, hold=k < count - 1))
    return found


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    return {t: sorted(tuple(r) for r in rows(db, f"SELECT * FROM {t}")) for t in AGGREGATES}


def pending(db: Path) -> int:
    return int(rows(db, "SELECT count(*) FROM aggregate_pending")[0][0])


def rolled_up(db: Path) -> int:
    """Hits counted by the daily total rollup."""
    found = rows(
        db, "SELECT coalesce(sum(hits), 0) FROM rollup_hits WHERE dim = 'total' AND grain = 'day'"
    )
    return int(found[0][0])


async def wait_rolled_up(db: Path, hits: int, failure: str) -> None:
    """Until the daily total rollup counts ``hits``; fails after 5 s with ``failure``."""
    started = time.monotonic()
    while rolled_up(db) != hits:
        assert time.monotonic() - started < 5, failure
        await asyncio.sleep(0.02)


def settings_for(tmp_path: Path, name: str, **storage: Any) -> Settings:
    folder = tmp_path / name
    folder.mkdir()
    return make_settings(folder, storage=storage)


async def opened(settings: Settings, *, sole_writer: bool) -> Storage:
    storage = open_storage(settings, aggregators(settings), sole_writer=sole_writer)
    await storage.open()
    return storage


async def reference(tmp_path: Path, written: list[Batch]) -> dict[str, list[tuple[Any, ...]]]:
    """The aggregates of ``written`` when every batch writes its own (no window)."""
    settings = settings_for(tmp_path, "reference")
    storage = await opened(settings, sole_writer=False)
    try:
        for batch in written:
            await storage.write_batch(Batch(hits=batch.hits, pixel_counts=batch.pixel_counts))
    finally:
        await storage.close()
    return snapshot(Path(settings.storage.path))


def now_ms() -> int:
    return int(time.time() * 1000) - 3_600_000


async def two_held(
    tmp_path: Path, name: str, written: list[Batch], **storage: Any
) -> tuple[Storage, Settings]:
    """The writer process's storage with the first two of ``written`` in its window."""
    settings = settings_for(tmp_path, name, **storage)
    storage = await opened(settings, sole_writer=True)
    await storage.write_batch(written[0])
    await storage.write_batch(written[1])
    return storage, settings


async def test_a_window_writes_exactly_what_its_batches_would_have(tmp_path: Path) -> None:
    n = 8  # batches a window sums
    written = batches(now_ms(), count=n + 2)
    storage, settings = await two_held(
        tmp_path, "window", written, aggregate_batches=n, aggregate_max_age_ms=60_000
    )
    db = Path(settings.storage.path)
    try:
        # Held: the hits are stored, their aggregates wait, their ranges are on record.
        assert len(rows(db, "SELECT id FROM hits")) == 600
        assert rolled_up(db) == 0 and pending(db) == 2
        assert sum(r[0] for r in rows(db, "SELECT hits FROM pixel_counts")) == 600
        for batch in written[2 : n - 1]:
            await storage.write_batch(batch)
        assert rolled_up(db) == 0 and pending(db) == n - 1
        await storage.write_batch(written[n - 1])  # the n-th batch ends the window
        assert rolled_up(db) == n * 300 and pending(db) == 0
        for batch in written[n:]:
            await storage.write_batch(batch)
    finally:
        await storage.close()
    assert pending(db) == 0
    assert snapshot(db) == await reference(tmp_path, written)


async def test_a_window_ends_at_its_maximum_age_whether_or_not_batches_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The age bounds how far the dashboard's aggregates lag the hits
    # (storage.aggregate_max_age_ms). The idle end is put out of reach, so that only the
    # age can end these windows.
    monkeypatch.setattr(sqlite_storage, "_IDLE_S", 60.0)
    settings = settings_for(tmp_path, "age", aggregate_max_age_ms=300)
    db = Path(settings.storage.path)
    storage = await opened(settings, sole_writer=True)
    try:
        # Batches every 0.1 s: a window holds ~3 of them, not the 8 it may by count.
        held = []
        for batch in batches(now_ms(), count=11)[:10]:  # all ten held
            await storage.write_batch(batch)
            held.append(pending(db))
            await asyncio.sleep(0.1)
        assert max(held) <= 5, held
        assert rolled_up(db) >= 300 * 5
        # Nothing follows the last two: they are written once their window is 0.3 s old.
        await wait_rolled_up(db, 3000, "a window outlived its maximum age")
        assert pending(db) == 0
    finally:
        await storage.close()


async def test_held_aggregates_appear_within_a_second(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "idle")
    db = Path(settings.storage.path)
    storage = await opened(settings, sole_writer=True)
    try:
        (batch,) = batches(now_ms(), count=1)
        batch.hold = True
        await storage.write_batch(batch)
        assert rolled_up(db) == 0 and pending(db) == 1
        await wait_rolled_up(db, 300, "a window nothing followed never ended")
        assert pending(db) == 0
    finally:
        await storage.close()


async def test_close_writes_the_open_window(tmp_path: Path) -> None:
    written = batches(now_ms(), count=3)
    written[-1].hold = True
    settings = settings_for(tmp_path, "close")
    storage = await opened(settings, sole_writer=True)
    for batch in written:
        await storage.write_batch(batch)
    await storage.close()
    db = Path(settings.storage.path)
    assert pending(db) == 0
    assert snapshot(db) == await reference(tmp_path, written)


_CRASHING_WRITER = """
import asyncio, os, sys
from pathlib import Path
from tests.test_aggregate_window import batches, opened
from tests.conftest import make_settings

async def main():
    settings = make_settings(Path(sys.argv[1]))
    storage = await opened(settings, sole_writer=True)
    for batch in batches(int(sys.argv[2]), count=3):
        batch.hold = True
        await storage.write_batch(batch)
    os._exit(0)  # dies with the window open: no close, no idle end

asyncio.run(main())
"""


async def test_a_writer_that_dies_with_a_window_open_loses_no_aggregate(tmp_path: Path) -> None:
    start = now_ms()
    settings = settings_for(tmp_path, "crash")
    db = Path(settings.storage.path)
    subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(db.parent), str(start)],
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert len(rows(db, "SELECT id FROM hits")) == 900
    assert rolled_up(db) == 0 and pending(db) == 3
    storage = await opened(settings, sole_writer=True)  # the next writer catches up
    await storage.close()
    assert pending(db) == 0
    assert snapshot(db) == await reference(tmp_path, batches(start, count=3))


async def test_a_rebuild_during_a_window_counts_every_hit_once(tmp_path: Path) -> None:
    start = now_ms()
    written = batches(start, count=3)
    storage, settings = await two_held(tmp_path, "rebuild", written)
    db = Path(settings.storage.path)
    try:
        assert pending(db) == 2
        # A governance rebuild of the whole span (as after a block or release).
        async with storage.transaction() as tx:
            await ipstats.rebuild(tx, start - 86_400_000, start + 86_400_000)
            await rollups.rebuild(tx, start - 86_400_000, start + 86_400_000)
        await storage.write_batch(written[2])
    finally:
        await storage.close()
    assert rolled_up(db) == 900
    assert snapshot(db) == await reference(tmp_path, written)


async def test_an_erasure_during_a_window_leaves_no_trace_of_the_subject(tmp_path: Path) -> None:
    written = batches(now_ms(), count=3)
    assert any(h.visitor_id == ERASED for h in written[0].hits)
    # The batch after the erasure brings nothing new from the subject.
    written[2].hits = [h for h in written[2].hits if h.visitor_id != ERASED]
    storage, settings = await two_held(tmp_path, "erasure", written)
    db = Path(settings.storage.path)
    try:
        erased = await erase(storage, Subject("visitor", ERASED), SECRET, rebuilders(settings))
        assert erased.hits > 0
        await storage.write_batch(written[2])
    finally:
        await storage.close()
    assert not rows(db, "SELECT 1 FROM ipstat_values WHERE visitor = ?", (ERASED,))
    kept = [
        Batch(hits=[h for h in b.hits if h.visitor_id != ERASED], pixel_counts=b.pixel_counts)
        for b in written
    ]
    assert rolled_up(db) == sum(len(b.hits) for b in kept)
    assert snapshot(db) == await reference(tmp_path, kept)


async def test_a_window_end_the_idle_timer_starts_during_a_batch_never_outlives_close(
    tmp_path: Path,
) -> None:
    # The idle timer of a held window may fire while another batch holds the write lock;
    # its window end then waits for the lock. Once it has it, it must find the window
    # ended and the storage as it is, not run on connections closed meanwhile (an
    # exception in a task nobody awaits).
    failures: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    settings = settings_for(tmp_path, "closing")
    storage = await opened(settings, sole_writer=True)
    first, last = batches(now_ms(), count=2)
    await storage.write_batch(first)  # held: its idle timer runs
    ending = asyncio.create_task(storage.write_batch(last))  # ends the window
    await asyncio.sleep(0)
    assert storage._batch_lock.locked()  # type: ignore[attr-defined]
    storage._idle_end()  # type: ignore[attr-defined]  # the timer fires now
    await ending
    await storage.close()
    for _ in range(5):
        await asyncio.sleep(0.01)
    gc.collect()
    await asyncio.sleep(0)
    assert failures == []
    db = Path(settings.storage.path)
    assert pending(db) == 0 and rolled_up(db) == 600


async def test_close_waits_for_a_batch_under_way(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "in-flight")
    storage = await opened(settings, sole_writer=True)
    (batch,) = batches(now_ms(), count=1)
    writing = asyncio.create_task(storage.write_batch(batch))
    await asyncio.sleep(0)
    assert storage._batch_lock.locked()  # type: ignore[attr-defined]
    await storage.close()
    await writing  # stored before the connections closed, not failed by it
    db = Path(settings.storage.path)
    assert pending(db) == 0 and rolled_up(db) == 300
