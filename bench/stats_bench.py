"""Stats benchmark: 5 million synthetic hits in SQLite, then each dashboard query timed.

Loading goes through the real storage path: ``SQLiteStorage.write_batch`` with the real
``Rollups`` aggregator, one batch per simulated day (about 13,700 hits), so the rollups
are exactly what the live writer would produce (only user-agent/GeoIP enrichment is
skipped: the rows are generated already enriched).

    python bench/stats_bench.py load  --db /tmp/stats-bench.db [--hits 5000000]
    python bench/stats_bench.py query --db /tmp/stats-bench.db [--runs 7]
    python bench/stats_bench.py write-cost --db /tmp/stats-bench.db
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.aggregates import aggregators
from collector.config import load_settings
from collector.storage.base import Batch, HitRow
from collector.storage.sqlite import SQLiteStorage

DAY_MS = 86_400_000
END_DAY = "2026-11-30"
DAYS = 365


def _zipf(n: int, s: float = 1.1) -> list[float]:
    return list(itertools.accumulate(1 / (i + 1) ** s for i in range(n)))


class Pick:
    def __init__(self, values: list[str], s: float = 1.1) -> None:
        self.values = values
        self.cum = _zipf(len(values), s)
        self.total = self.cum[-1]

    def __call__(self, rnd: random.Random) -> str:
        return self.values[bisect.bisect(self.cum, rnd.random() * self.total)]


def generators(seed: int = 7) -> dict[str, Any]:
    return {
        "page": Pick([f"https://kdvonline.kz/catalog/item-{i}" for i in range(3000)]),
        "ref": Pick(
            [""] + [f"https://site{i}.example/p" for i in range(60)] + ["https://www.google.com/"],
            0.9,
        ),
        "placement": Pick([""] + [f"ad-{i}" for i in range(25)], 0.8),
        "browser": Pick(
            [
                "Chrome",
                "Safari",
                "Yandex Browser",
                "Firefox",
                "Edge",
                "Opera",
                "Samsung Internet",
                "Chrome Mobile",
                "Mobile Safari",
                "UC Browser",
            ]
        ),
        "os": Pick(["Android", "Windows", "iOS", "Mac OS X", "Linux", "Chrome OS"]),
        "device": Pick(["mobile", "pc", "tablet", "bot", "other"], 1.5),
        "country": Pick(
            ["KZ", "RU", "KG", "UZ", "DE", "US", "TR", "CN", "GB", "BT"]
            + [f"X{i}" for i in range(20)],
            1.6,
        ),
        "source": Pick(["web", "app", "server"], 1.8),
    }


def day_rows(day_ms: int, n: int, rnd: random.Random, g: dict[str, Any]) -> list[HitRow]:
    visitors = max(50, n // 5)
    out = []
    for _ in range(n):
        vid = (
            f"v{rnd.randrange(visitors * 40)}"
            if rnd.random() < 0.2
            else f"d{day_ms // DAY_MS}-{rnd.randrange(visitors)}"
        )
        ref = g["ref"](rnd)
        out.append(
            HitRow(
                ts_ms=day_ms + rnd.randrange(DAY_MS),
                ip=f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.1",
                visitor_id=vid,
                session_id="s",
                cookies=None,
                user_agent="bench",
                browser_family=g["browser"](rnd),
                browser_version="1",
                os_family=g["os"](rnd),
                os_version="1",
                device_family="x",
                device_brand="x",
                device_class=g["device"](rnd),
                page_url=g["page"](rnd),
                referrer_url=ref or None,
                placement_id=g["placement"](rnd) or None,
                country=g["country"](rnd),
                region=None,
                city=None,
                consent_id="c",
                policy_version="1",
                source=g["source"](rnd),
            )
        )
    return out


def end_ms() -> int:
    return int(time.mktime(time.strptime(END_DAY, "%Y-%m-%d")) - time.timezone) * 1000 + DAY_MS


async def load(db: Path, hits: int) -> None:
    settings = load_settings(None, environ={"COLLECTOR_STORAGE_PATH": str(db)})
    storage = SQLiteStorage(settings, aggregators(settings))
    await storage.open()
    rnd = random.Random(7)
    g = generators()
    per_day = hits // DAYS
    first = end_ms() - DAYS * DAY_MS
    started = time.perf_counter()
    gen_s = 0.0
    for i in range(DAYS):
        day = first + i * DAY_MS
        t = time.perf_counter()
        rows = day_rows(day, per_day + (hits % DAYS if i == DAYS - 1 else 0), rnd, g)
        counts = {}
        for state, share in (
            ("granted", 1.0),
            ("refused", 0.25),
            ("absent", 0.5),
            ("invalid", 0.01),
        ):
            counts[
                (time.strftime("%Y-%m-%d", time.gmtime(day / 1000)), "/catalog/item-0", state)
            ] = int(len(rows) * share)
        gen_s += time.perf_counter() - t
        await storage.write_batch(Batch(hits=rows, pixel_counts=counts))
        if i % 30 == 0:
            print(f"day {i}: {time.perf_counter() - started:.0f}s", flush=True)
    total = time.perf_counter() - started
    sizes = await storage.fetch_all(
        "SELECT (SELECT COUNT(*) FROM hits) AS hits, (SELECT COUNT(*) FROM rollup_hits) AS rh,"
        " (SELECT COUNT(*) FROM rollup_hll) AS hll"
    )
    await storage.close()
    print(json.dumps({"load_s": round(total, 1), "generate_s": round(gen_s, 1), **sizes[0]}))


async def query(db: Path, runs: int) -> None:
    from collector import stats

    settings = load_settings(None, environ={"COLLECTOR_STORAGE_PATH": str(db)})
    storage = SQLiteStorage(settings)
    await storage.open()
    to_day = END_DAY
    k = 5

    def q(days: int, **kw: Any) -> stats.Query:
        return stats.parse_query({"to": to_day, "from": stats.shift(to_day, -(days - 1)), **kw})

    cases: dict[str, Callable[[], Awaitable[Any]]] = {}
    for days in (30, 365):
        base = q(days)
        cases[f"summary {days}d"] = lambda b=base: stats.summary(storage, b, k)
        cases[f"timeseries day {days}d"] = lambda b=base: stats.timeseries(storage, b, k)
        for dim in stats.DIMENSIONS:
            cases[f"top {dim} {days}d"] = lambda b=base, d=dim: stats.breakdown(
                storage, dataclasses.replace(b, by=d), k
            )
        cases[f"consent {days}d"] = lambda b=base: stats.consent(storage, b)
    cases["timeseries hour 7d"] = lambda: stats.timeseries(storage, q(7, granularity="hour"), k)
    cases["top country, placement filter 30d"] = lambda: stats.breakdown(
        storage, q(30, by="country", placement="ad-3"), k
    )
    cases["timeseries, country filter 30d"] = lambda: stats.timeseries(
        storage, q(30, country="RU"), k
    )
    cases["summary, page filter 30d"] = lambda: stats.summary(
        storage, q(30, page="/catalog/item-3"), k
    )
    cases["top country, source filter 365d"] = lambda: stats.breakdown(
        storage, q(365, by="country", source="app"), k
    )
    # ranges that do not line up with calendar months read more day rows
    mid = {"to": "2026-11-15", "from": "2026-10-17"}
    for dim in ("page", "browser", "country"):
        cases[f"top {dim} 30d mid-month"] = lambda d=dim: stats.breakdown(
            storage, stats.parse_query({**mid, "by": d}), k
        )
    cases["summary 30d mid-month"] = lambda: stats.summary(storage, stats.parse_query(mid), k)
    results = {}
    for name, run in cases.items():
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            await run()
            times.append((time.perf_counter() - t) * 1000)
        results[name] = round(statistics.median(times), 1)
        print(f"{name:40s} median {results[name]:7.1f} ms  max {max(times):7.1f} ms", flush=True)
    await storage.close()
    print(json.dumps(results))


async def write_cost(db: Path, days: int = 10, batch: int = 2000) -> None:
    """Writer cost with and without the rollup aggregator, in live-sized batches."""
    rnd = random.Random(3)
    g = generators()
    days_rows = [day_rows(end_ms() - (d + 1) * DAY_MS, 13_698, rnd, g) for d in range(days)]
    for with_rollups in (False, True):
        path = db.with_name(f"{db.stem}-write-{with_rollups}.db")
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        settings = load_settings(None, environ={"COLLECTOR_STORAGE_PATH": str(path)})
        storage = SQLiteStorage(settings, aggregators(settings) if with_rollups else [])
        await storage.open()
        started, n = time.perf_counter(), 0
        for rows in days_rows:
            rows = sorted(rows, key=lambda h: h.ts_ms)
            for i in range(0, len(rows), batch):
                await storage.write_batch(Batch(hits=rows[i : i + batch]))
                n += len(rows[i : i + batch])
        took = time.perf_counter() - started
        await storage.close()
        per_batch = 1000 * took / (n / batch)
        print(f"rollups={with_rollups}: {n / took:.0f} hits/s, {per_batch:.1f} ms/batch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["load", "query", "write-cost"])
    parser.add_argument("--db", type=Path, default=Path("/tmp/stats-bench.db"))
    parser.add_argument("--hits", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if args.phase == "load":
        asyncio.run(load(args.db, args.hits))
    elif args.phase == "write-cost":
        asyncio.run(write_cost(args.db))
    else:
        asyncio.run(query(args.db, args.runs))


if __name__ == "__main__":
    main()
