"""Micro-benchmark: rows/s into SQLite through the real write path.

Four figures: ``SQLiteStorage.write_batch`` alone as the writer process stores (pre-built
rows, one transaction per 2,000; target 100,000 rows/s; every hit a new visitor id, then
again with 9 in 10 visitors returning as in ``_visits``), the same into a grown store
(``--grown`` hits of earlier hours already stored, each from a new random visitor id as
the pixel issues them: the hours tables then outgrow the page cache), the whole
``BatchWriter`` (enrichment of raw hits -- user agent, GeoIP, URL sanitising -- plus the
anonymous counters and the writes) fed as fast as it drains, and ``write_batch`` with
the aggregators (rollups and IP statistics) on the realistic mix of ``bench/mix.py``:
2,000 consented visitors who keep one user agent and address, 9 in 10 returning with
their visitor id (target 30,000 hits/s on one core).

    python -m bench.micro_writer [--hits 200000] [--grown 500000] [--automatic-gc]

Each batch is written as the writer process writes it: with the cyclic collector paused,
and one collection pass after it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.mix import GEOIP, Mix, build_mix
from collector.config import Settings
from collector.storage.base import Aggregator, AnonHit, Batch, HitRow, RawHit
from collector.storage.sqlite import SQLiteStorage


async def _run(
    hits: int,
    work: Path,
    batch_sizes: tuple[int, ...],
    automatic_gc: bool = False,
    grown: int = 0,
) -> dict[str, float]:
    from collector.enrich import Enricher
    from collector.geo import GeoIP
    from collector.metrics import Metrics
    from collector.writer import BatchWriter
    from collector.writer_process import BatchCollection

    # The writer process stores each batch with the cyclic collector paused and runs one
    # pass after it (``BatchCollection``); ``--automatic-gc`` measures without that.
    collection = BatchCollection()

    def per_batch() -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if automatic_gc else collection.after()

    mix = build_mix()
    settings = _settings(work / "w.db")
    now = int(time.time() * 1000)
    items = _target_hits(mix, hits, now)
    consented = sum(isinstance(x, RawHit) for x in items)

    # The writer process's storage: the file's one writer (``sole_writer``), which notes
    # the hours tables of subject lookups in bulk (storage.sqlite ``_NOTE_HITS``).
    storage = SQLiteStorage(settings, sole_writer=True)
    await storage.open()
    geoip = GeoIP(settings.geoip)
    geoip.open()
    enricher = Enricher(settings, geoip)
    results: dict[str, float] = {}
    try:
        # write_batch alone.
        rows = [enricher.row(x) for x in items if isinstance(x, RawHit)]
        elapsed, cpu = await _timed(_at(settings, work / "alone.db"), rows, 2000, per_batch)
        results["write_batch rows/s"] = len(rows) / elapsed
        # Rows per CPU second of the whole process (event loop and SQLite thread): the
        # figure to trust when other processes share the machine.
        results["write_batch rows per CPU s"] = len(rows) / cpu
        # The same on the realistic mix of ``_visits`` (9 in 10 visitors return, so their
        # hours are mostly noted already), into a fresh file. Above, every hit is a new
        # visitor id: one new visitor_hours row a hit, the worst case for the writer.
        returning = [enricher.row(x) for x in _visits(mix, len(rows), now)]
        elapsed, cpu = await _timed(
            _at(settings, work / "returning.db"), returning, 2000, per_batch
        )
        results["write_batch rows/s (returning visitors)"] = len(returning) / elapsed
        results["write_batch rows per CPU s (returning visitors)"] = len(returning) / cpu

        if grown:
            # A store that has run a while: ``grown`` hits in the hours before, each from a
            # new visitor with a random id. Each figure writes into its own copy of it.
            seed = await _grown_store(_at(settings, work / "grown.db"), rows, grown, now)
            new_visitors = _new_visitors(rows, random.Random(5))
            for name, part in (("every hit a new visitor", new_visitors), ("returning", returning)):
                copy = _durable_copy(seed, work / "grown-copy.db")
                elapsed, cpu = await _timed(_at(settings, copy), part, 2000, per_batch)
                copy.unlink()
                tag = f"(grown store of {grown:,} hits, {name})"
                results[f"write_batch rows/s {tag}"] = len(part) / elapsed
                results[f"write_batch rows per CPU s {tag}"] = len(part) / cpu

        # The whole writer, enrichment included (caches warm from the pass above: the
        # UA list and page set repeat in traffic, as they do on the store).
        writer = BatchWriter(
            storage, enricher, batch_size=2000, flush_interval_ms=200,
            queue_size=hits + 1, queue_wait_ms=50, metrics=Metrics(),
        )  # fmt: skip
        await writer.start()
        started, cpu = time.perf_counter(), time.process_time()
        for item in items:
            writer.put_nowait(item)
        await writer.flush()
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        await writer.stop()
        results["BatchWriter rows/s (consented, enriched)"] = consented / elapsed
        results["BatchWriter rows per CPU s"] = consented / cpu
        results["BatchWriter hits/s (incl. 30% anonymous)"] = hits / elapsed

        # write_batch with rollups and IP statistics, returning visitors (bench/mix.py), in
        # batches of 2,000 (the session-2 default) and of 8,000 (today's batch_size, what
        # a busy or lagging writer takes), each on a fresh file.
        from collector.aggregates import aggregators

        rows = [enricher.row(x) for x in _visits(mix, consented, now)]
        for size in batch_sizes:
            settings = _at(settings, work / f"agg-{size}.db")
            elapsed, cpu = await _timed(
                settings, rows, size, per_batch, aggregators(settings), sole=False
            )
            tag = "" if size == 2000 else f" (batches of {size})"
            results[f"write path (rollups + IP statistics) hits/s{tag}"] = len(rows) / elapsed
            results[f"write path hits per CPU s{tag}"] = len(rows) / cpu
            results[f"write path CPU us per hit{tag}"] = 1e6 * cpu / len(rows)
    finally:
        await storage.close()
        geoip.close()
    return results


def _settings(path: Path) -> Settings:
    """The benchmark's settings: the store at ``path``, the test GeoIP databases."""
    from collector.config import load_settings

    return load_settings(
        None,
        environ={
            "COLLECTOR_STORAGE_PATH": str(path),
            "COLLECTOR_CONSENT_SECRET": "micro-writer-secret-0123456789",
            "COLLECTOR_GEOIP_CITY_DB": str(GEOIP / "GeoIP2-City-Test.mmdb"),
            "COLLECTOR_GEOIP_ASN_DB": str(GEOIP / "GeoLite2-ASN-Test.mmdb"),
            "COLLECTOR_GEOIP_ANONYMOUS_DB": str(GEOIP / "GeoIP2-Anonymous-IP-Test.mmdb"),
        },
    )


def _target_hits(mix: Mix, hits: int, now: int) -> list[RawHit | AnonHit]:
    """The target figure's hits: 7 in 10 consented, each with a new visitor id (one
    session per 5), one a millisecond; the others anonymous."""
    rnd = random.Random(7)
    pages = [f"https://shop.example.kz/catalog/item-{i}?utm_source=x&sid=1" for i in range(5000)]
    items: list[RawHit | AnonHit] = []
    for i in range(hits):
        if i % 10 < 7:
            items.append(
                RawHit(
                    now + i,
                    rnd.choice(mix.ips),
                    rnd.choice(mix.user_agents),
                    rnd.choice(pages),
                    "https://www.google.com/",
                    "",
                    f"{i:032x}",
                    f"{i // 5:032x}",
                    "consent-id-0001",
                    "1",
                    (),
                )
            )
        else:
            items.append(AnonHit(now + i, rnd.choice(pages), "absent"))
    return items


async def _timed(
    settings: Settings,
    rows: list[HitRow],
    size: int,
    per_batch: Callable[[], contextlib.AbstractContextManager[None]],
    aggregators: Sequence[Aggregator] = (),
    *,
    sole: bool = True,
) -> tuple[float, float]:
    """Wall and CPU seconds to write ``rows`` in batches of ``size`` into the store at
    ``settings``, as the writer process's storage (``sole``) or another's, and close it:
    what a store leaves to its close (the last window's aggregates, the hours of hits
    still waiting to be noted) counts too."""
    storage = SQLiteStorage(settings, aggregators, sole_writer=sole)
    await storage.open()
    try:
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(rows), size):
            with per_batch():
                await storage.write_batch(Batch(hits=rows[i : i + size]))
    finally:
        await storage.close()
    return time.perf_counter() - started, time.process_time() - cpu


async def _grown_store(settings: Settings, rows: list[HitRow], hits: int, now: int) -> Path:
    """A closed store holding ``hits`` hits of the hours before ``now``: ``rows``
    again, each with a new random visitor id (and session), ~18,000 hits a second."""
    storage = SQLiteStorage(settings, sole_writer=True)
    await storage.open()
    try:
        start, rnd = now - hits // 18 - 3_600_000, random.Random(3)
        for first in range(0, hits, 8000):
            part = [
                rows[i % len(rows)]._replace(ts_ms=start + i // 18)
                for i in range(first, min(hits, first + 8000))
            ]
            await storage.write_batch(Batch(hits=_new_visitors(part, rnd)))
    finally:
        await storage.close()
    return Path(settings.storage.path)


def _durable_copy(source: Path, target: Path) -> Path:
    """``source`` copied to ``target`` and on disk. A store that has run a while has no
    dirty pages in the OS's cache: left dirty, the copy's hundreds of MB were written back
    during the timed writes, by the first checkpoint's fsync of the file."""
    shutil.copyfile(source, target)
    with target.open("rb+") as f:
        os.fsync(f.fileno())
    return target


def _new_visitors(rows: list[HitRow], rnd: random.Random) -> list[HitRow]:
    """``rows``, each from a new browser: random visitor and session ids, as the pixel
    issues them (``pixel._IdSource``)."""
    return [
        row._replace(
            visitor_id=f"{rnd.getrandbits(128):032x}", session_id=f"{rnd.getrandbits(128):032x}"
        )
        for row in rows
    ]


def _at(settings: Settings, path: Path) -> Settings:
    return dataclasses.replace(
        settings, storage=dataclasses.replace(settings.storage, path=str(path))
    )


def _visits(mix: Mix, n: int, start_ms: int, seed: int = 1) -> list[RawHit]:
    """Consented hits as ``Mix.requests`` makes them: visitor k keeps ``mix.visitor(k)``,
    9 in 10 keep their visitor and session ids, the others are new browsers each hit;
    ~18,000 hits a second of traffic time. The returning visitors are the same for
    every ``seed``; the order of visits and the new browsers' ids differ."""
    ids_rnd = random.Random(11)
    visitors = len(mix.consented)
    ids = [
        (f"{ids_rnd.getrandbits(128):032x}", f"{ids_rnd.getrandbits(128):032x}")
        for _ in range(visitors)
    ]
    rnd = random.Random(seed)
    sections = ("catalog", "product", "blog", "cart", "search", "account")
    out = []
    for i in range(n):
        k = rnd.randrange(visitors)
        ua, ip = mix.visitor(k)
        vid, sid = ids[k]
        if k % 10 == 0:
            vid, sid = f"{rnd.getrandbits(128):032x}", f"{rnd.getrandbits(128):032x}"
        p = rnd.randrange(5000)
        out.append(
            RawHit(
                start_ms + i // 18,
                ip,
                ua,
                f"https://shop.example.kz/{sections[p % 6]}/item-{p}",
                "https://www.google.com/search?q=shop" if p % 3 == 0 else "",
                f"banner-{p % 20}" if p % 10 == 0 else "",
                vid,
                sid,
                "consent-id-0001",
                "1",
                (),
            )
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hits", type=int, default=200_000)
    ap.add_argument(
        "--batch-sizes", default="2000,8000", help="write-path batch sizes, comma-separated"
    )
    ap.add_argument(
        "--grown",
        type=int,
        default=500_000,
        help="hits already stored for the grown-store figures (0: skip them)",
    )
    ap.add_argument(
        "--automatic-gc",
        action="store_true",
        help="leave the cyclic GC automatic during each batch (the writer process pauses it)",
    )
    args = ap.parse_args(argv)
    sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="collector-micro-") as tmp:
        results = asyncio.run(_run(args.hits, Path(tmp), sizes, args.automatic_gc, args.grown))
    width = max(map(len, results))
    print(f"\n{'writer, ' + str(args.hits) + ' hits':{width}}  per second")
    for name, value in results.items():
        print(f"{name:{width}}  {value:10.0f}")
    return results


if __name__ == "__main__":
    main()
