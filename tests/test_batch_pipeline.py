"""The batch writer builds the next batch while the one before it is being stored.

What the pixel relies on: the queue drains as fast as its slower stage (building here,
storing in the writer process or SQLite's thread), batches land one at a time and in
the order they were cut, and stopping stores everything accepted.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collector.enrich import Enricher
from collector.geo import GeoIP
from collector.metrics import Metrics
from collector.storage import open_storage
from collector.storage.base import RawHit, Storage
from collector.writer import BatchBuilder, BatchWriter, Item, LocalSink, Tally
from tests.conftest import make_settings, rows

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"


class TimedSink:
    """The real in-process sink (real SQLite), with each stage's start and end noted,
    and storing slowed down so that overlapping stages would show."""

    def __init__(self, storage: Storage, builder: BatchBuilder, store_s: float) -> None:
        self.inner = LocalSink(storage, builder)
        self.filters = self.inner.filters
        self.store_s = store_s
        self.events: list[tuple[str, int, float]] = []
        self._built = 0

    async def prepare(self, items: Sequence[Item], hold: bool) -> tuple[Any, int]:
        k = self._built
        self._built += 1
        self.events.append(("build", k, time.monotonic()))
        job = await self.inner.prepare(items, hold)
        self.events.append(("built", k, time.monotonic()))
        return job, k

    async def deliver(self, job: tuple[Any, int]) -> Tally:
        inner, k = job
        self.events.append(("store", k, time.monotonic()))
        await asyncio.sleep(self.store_s)
        tally = await self.inner.deliver(inner)
        self.events.append(("stored", k, time.monotonic()))
        return tally


async def test_the_next_batch_is_built_while_one_is_stored_and_batches_land_in_order(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    storage = open_storage(settings)
    await storage.open()
    geoip = GeoIP(settings.geoip)
    sink = TimedSink(storage, BatchBuilder(Enricher(settings, geoip)), store_s=0.05)
    writer = BatchWriter(
        storage, None, batch_size=100, flush_interval_ms=5, queue_size=10_000,
        queue_wait_ms=1000, metrics=Metrics(), sink=sink,
    )  # fmt: skip
    await writer.start()
    start = int(time.time() * 1000)
    try:
        for i in range(600):
            hit = RawHit(
                start + i, "81.2.69.142", CHROME, f"https://s.kz/{i}", "", "",
                f"{i:032x}", "s" * 32, "c-1", "1", (),
            )  # fmt: skip
            assert writer.put_nowait(hit)
        await writer.stop()  # everything accepted is stored before it returns
    finally:
        await storage.close()
    stored = rows(tmp_path / "collector.db", "SELECT ts_ms FROM hits ORDER BY id")
    assert [r["ts_ms"] for r in stored] == [start + i for i in range(600)]  # in order
    stores = [(k, t) for kind, k, t in sink.events if kind in ("store", "stored")]
    # One batch stored at a time, in the order the batches were cut.
    assert [k for k, _ in stores] == [k for k in range(len(stores) // 2) for _ in (0, 1)]
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(stores))
    # And the next batch was ready before the one before it was stored: built meanwhile.
    built = {k: t for kind, k, t in sink.events if kind == "built"}
    stored_at = {k: t for kind, k, t in sink.events if kind == "stored"}
    ahead = [k for k in stored_at if k + 1 in built and built[k + 1] < stored_at[k]]
    assert len(ahead) >= 3, sink.events
