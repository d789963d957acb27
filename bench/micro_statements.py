"""Micro-benchmark: where a batch's write goes, statement by statement, per batch size.

The realistic consented mix of ``bench.micro_writer`` (returning visitors, 5,000 pages),
enriched, then written through the real aggregators (rollups, IP statistics) at one batch
size per fresh SQLite file, with the write connection's pragmas. Prints CPU microseconds
per hit for the Python preparation and for each statement and the COMMIT: the table
behind the choice of ``storage.batch_size`` (docs/PERFORMANCE.md, session 3).

    python -m bench.micro_statements [--hits 200000] [--batch-sizes 2000,8000] [--prefill N]
                                     [--window K]

``--window K`` sums the aggregates of K consecutive batches before writing them, as the
writer process does (``storage.aggregate_batches``; session 5).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from bench.micro_writer import _visits
from bench.mix import GEOIP, build_mix
from collector.storage.base import HitRow
from collector.storage.driver import connect
from collector.storage.sqlite import _CACHE_KIB, _CHECKPOINT_BYTES, PAGE_SIZE, SQLiteStorage


def _measure(
    rows: list[HitRow],
    size: int,
    work: Path,
    prefill: list[HitRow],
    window: int = 1,
    page_size: int = 0,
) -> None:
    from collector.aggregates import aggregators
    from collector.config import load_settings
    from collector.storage.base import Batch

    path = work / f"statements-{size}.db"
    settings = load_settings(None, environ={"COLLECTOR_STORAGE_PATH": str(path)})
    if page_size:  # fixed when the file is first written
        with sqlite3.connect(path) as fresh:
            fresh.execute(f"PRAGMA page_size = {page_size}")
            fresh.execute("PRAGMA journal_mode = WAL")
    storage = SQLiteStorage(settings, aggregators(settings))
    asyncio.run(_migrate(storage))  # the schema; the timed writes use their own connection
    conn = connect(path, isolation_level=None)  # secure_delete, as the store's connections
    for pragma in ("journal_mode = WAL", "synchronous = NORMAL", f"cache_size = -{_CACHE_KIB}"):
        conn.execute(f"PRAGMA {pragma}")
    pages = _CHECKPOINT_BYTES // conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
    generations: dict[str, int] = {}
    for aggregate in storage._windowed:
        found = conn.execute(aggregate.generation_sql).fetchone()
        generations[aggregate.generation_sql] = found[0] if found else 0
    # Untimed: the hits a store already holds (the random-key indexes grow with them).
    for i in range(0, len(prefill), size):
        alone = storage._new_window(generations)  # each prefill batch its own window
        statements = storage._batch_statements(Batch(hits=prefill[i : i + size]), alone)
        found, prefilled = alone.statements()
        statements += found
        conn.execute("BEGIN IMMEDIATE")
        for sql, params in statements:
            conn.executemany(sql, params)
        conn.execute("COMMIT")
        for done in prefilled:
            done()
    spent: defaultdict[str, float] = defaultdict(float)
    count: Counter[str] = Counter()
    prepare = 0.0
    started = time.process_time()
    summing = storage._new_window(generations)
    for k, i in enumerate(range(0, len(rows), size)):
        batch = Batch(hits=rows[i : i + size])
        t = time.process_time()
        statements = storage._batch_statements(batch, summing)
        committed: list[Callable[[], None]] = []
        if (k + 1) % window == 0 or i + size >= len(rows):
            found, committed = summing.statements()
            statements += found
            summing = storage._new_window(generations)
        prepare += time.process_time() - t
        conn.execute("BEGIN IMMEDIATE")
        for sql, params in statements:
            t = time.process_time()
            conn.executemany(sql, params)
            name = sql.split("(")[0].removeprefix("INSERT INTO ").strip()
            spent[name] += time.process_time() - t
            count[name] += len(params)
        t = time.process_time()
        conn.execute("COMMIT")
        spent["COMMIT"] += time.process_time() - t
        for done in committed:
            done()
    total = time.process_time() - started
    conn.close()
    n = len(rows)
    held = f", {len(prefill):,} hits already stored" if prefill else ""
    held += f", page size {page_size or PAGE_SIZE}"
    summed = f", aggregates of {window} batches summed" if window > 1 else ""
    print(f"\nbatches of {size}{held}{summed}: {total / n * 1e6:.1f} us CPU per hit in all")
    print(f"  {prepare / n * 1e6:6.2f} us  Python: rollup and IP pre-aggregation, statements")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        rows_per_hit = f"{count[name] / n:5.2f} rows/hit" if name != "COMMIT" else ""
        print(f"  {seconds / n * 1e6:6.2f} us  {name:18} {rows_per_hit}")


async def _migrate(storage: SQLiteStorage) -> None:
    await storage.open()
    await storage.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hits", type=int, default=200_000)
    ap.add_argument("--batch-sizes", default="2000,8000")
    ap.add_argument(
        "--prefill", type=int, default=0, help="hits stored (untimed) before the measured ones"
    )
    ap.add_argument("--window", type=int, default=1, help="batches whose aggregates are summed")
    ap.add_argument("--page-size", type=int, default=0, help="SQLite page size (0: the store's)")
    args = ap.parse_args(argv)
    from collector.config import load_settings
    from collector.enrich import Enricher
    from collector.geo import GeoIP

    settings = load_settings(
        None,
        environ={
            "COLLECTOR_GEOIP_CITY_DB": str(GEOIP / "GeoIP2-City-Test.mmdb"),
            "COLLECTOR_GEOIP_ASN_DB": str(GEOIP / "GeoLite2-ASN-Test.mmdb"),
            "COLLECTOR_GEOIP_ANONYMOUS_DB": str(GEOIP / "GeoIP2-Anonymous-IP-Test.mmdb"),
        },
    )
    geoip = GeoIP(settings.geoip)
    geoip.open()
    enricher = Enricher(settings, geoip)
    now = int(time.time() * 1000)
    mix = build_mix()
    rows = [enricher.row(h) for h in _visits(mix, args.hits, now)]
    # Earlier traffic, ~18,000 hits a second of it (as _visits spaces them), before ``now``.
    earlier = now - args.prefill // 18 - 1000
    # Another stream: the same returning visitors, but new browsers of their own (with
    # the same stream, the measured hits' "new" visitor ids would all be stored already).
    prefill = [enricher.row(h) for h in _visits(mix, args.prefill, earlier, seed=2)]
    geoip.close()
    gc.collect()
    gc.freeze()  # as the writer process does: the bench's own rows are not its heap
    with tempfile.TemporaryDirectory(prefix="collector-statements-") as tmp:
        for size in (int(x) for x in args.batch_sizes.split(",")):
            _measure(rows, size, Path(tmp), prefill, args.window, args.page_size)


if __name__ == "__main__":
    main()
