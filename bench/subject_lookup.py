"""Micro-benchmark: what finding a subject's hits costs without an index on its value.

``hits`` has no index on the visitor id or the IP (``collector.subject_hours``): their
writes cost the pixel too much (docs/PERFORMANCE.md, sessions 6 and 7). This fills a
SQLite store with ``--hits`` hits spread over one day (random addresses and visitors),
plants a busy address (600 hits in the day's last hour) and a sparse one (a hit in
each of 24 hours, one visitor id), and a visitor of its own in each of those hours, then
times, as medians of 7, what engineers and the DPO wait for: the IP lookup's first page
of raw hits and every page, a subject export, and one erasure of each kind. A visitor's
hours are read a stored hour at a time (``visitor_hours`` is keyed by hour first), so
``--days`` sets what those cost. Last, for comparison, the first page through the old
``(ip, ts_ms)`` index, created for the purpose.

``--days D`` spreads ``--hits`` over D days (both planted addresses in the last one), as
a store that keeps its retention period does; it also times the engineers' IP page
(``ipreport.lookup``, 30 days), which reads the per-IP statistics of every day.

    python -m bench.subject_lookup [--hits 1000000] [--days 1]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from collector.aggregates import aggregators
from collector.config import load_settings
from collector.geo import GeoIP
from collector.ipreport import _HIT_FIELDS, lookup, raw_hits
from collector.storage import open_storage
from collector.storage.base import Batch, HitRow, Storage
from collector.subjects import Subject, erase, export
from collector.visibility import VISIBLE

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
BUSY, SPARSE, SPARSE_VISITOR = "203.0.113.9", "198.51.100.7", "c" * 32
VISITOR, VISITOR_IP = "d" * 32, "198.51.100.8"


def _hit(ts_ms: int, ip: str, visitor: str) -> HitRow:
    return HitRow(
        ts_ms, ip, visitor, "s" * 32, None, "Mozilla/5.0", "Chrome", "120", "Windows", "10",
        "Other", "Other", "desktop", f"https://s.kz/p/{ts_ms % 5000}", None, None, "GB",
        None, None, "c-1", "1", "web",
    )  # fmt: skip


def _days(n: int, day0: int, days: int) -> list[HitRow]:
    """``n`` random hits over ``days`` days ending with ``day0``'s, and the planted ones."""
    rnd = random.Random(1)
    start = day0 - (days - 1) * DAY_MS
    rows = [
        _hit(
            start + i * days * DAY_MS // n,
            f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}",
            f"{rnd.getrandbits(128):032x}",
        )
        for i in range(n)
    ]
    rows += [_hit(day0 + 23 * HOUR_MS + k * 5000, BUSY, "b" * 32) for k in range(600)]
    rows += [_hit(day0 + h * HOUR_MS + 1234, SPARSE, SPARSE_VISITOR) for h in range(24)]
    rows += [_hit(day0 + h * HOUR_MS + 4321, VISITOR_IP, VISITOR) for h in range(24)]
    return sorted(rows, key=lambda r: r.ts_ms)


async def _median_ms(run: Callable[[], Awaitable[Any]], times: int = 7) -> float:
    spent = []
    for _ in range(times):
        t = time.perf_counter()
        await run()
        spent.append((time.perf_counter() - t) * 1000)
    return statistics.median(spent)


async def _every_page(storage: Storage, ip: str) -> None:
    cursor: str | None = None
    while True:
        cursor = (await raw_hits(storage, ip, cursor, 50, False))["next_cursor"]
        if cursor is None:
            return


async def _main(n: int, days: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="collector-subjects-"))
    settings = load_settings(None, environ={"COLLECTOR_STORAGE_PATH": str(work / "c.db")})
    storage = open_storage(settings, aggregators(settings))
    await storage.open()
    try:
        day0 = (int(time.time() * 1000) // DAY_MS - 1) * DAY_MS
        rows = _days(n, day0, days)
        for i in range(0, len(rows), 8000):
            await storage.write_batch(Batch(hits=rows[i : i + 8000]))
        print(f"{len(rows):,} hits stored over {days} day(s)")
        geoip = GeoIP(settings.geoip)  # no databases configured: nothing to open or close
        for name, ip in (("busy address", BUSY), ("sparse address", SPARSE)):
            spent = await _median_ms(
                functools.partial(lookup, storage, geoip, settings.fraud, ip, days=30)
            )
            print(f"IP page (a 30-day window, first page of hits), {name}: {spent:.1f} ms")
        for name, ip in (("busy address", BUSY), ("sparse address", SPARSE)):
            first = await _median_ms(functools.partial(raw_hits, storage, ip, None, 50, False))
            every = await _median_ms(functools.partial(_every_page, storage, ip))
            print(f"IP lookup, {name}: first page {first:.1f} ms, every page {every:.1f} ms")
        for name, subject in (
            ("sparse address", Subject("ip", SPARSE)),
            ("busy address", Subject("ip", BUSY)),
            ("visitor in 24 hours", Subject("visitor", SPARSE_VISITOR)),
        ):
            spent = await _median_ms(functools.partial(export, storage, subject))
            print(f"export, {name}: {spent:.1f} ms")
        for name, subject in (
            ("sparse address", Subject("ip", SPARSE)),
            ("visitor in 24 hours", Subject("visitor", VISITOR)),
        ):
            t = time.perf_counter()
            done = await erase(storage, subject, "x" * 32, [])
            spent = (time.perf_counter() - t) * 1000
            print(f"erasure, {name}: {spent:.1f} ms, {done.hits} hits")
        await storage.execute("CREATE INDEX hits_ip ON hits (ip, ts_ms)")
        old = (
            f"SELECT {_HIT_FIELDS} FROM hits WHERE ip = ? AND {VISIBLE} "
            "ORDER BY ts_ms DESC, id DESC LIMIT 51"
        )
        spent = await _median_ms(lambda: storage.fetch_all(old, [BUSY]))
        print(f"IP lookup through the old index, busy address: first page {spent:.1f} ms")
    finally:
        await storage.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hits", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=1, help="days the hits are spread over")
    args = ap.parse_args(argv)
    asyncio.run(_main(args.hits, args.days))


if __name__ == "__main__":
    main()
