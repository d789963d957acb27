"""Write throughput into PostgreSQL: rows/s through ``PostgresStorage.write_batch``.

    python -m bench.pg_write --dsn postgresql://postgres@127.0.0.1/postgres --procs 2

Each process is one collector node's writer: batches of ``--batch`` enriched hits
(binary COPY + the pixel_counts upsert + the configured aggregators) into a scratch
schema that is dropped afterwards. Prints rows/s per process and in total.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import time

import asyncpg

from collector.aggregates import aggregators
from collector.config import load_settings
from collector.storage.base import Batch, HitRow
from collector.storage.postgres import PostgresStorage


def _row(i: int, now: int) -> HitRow:
    return HitRow(
        now + i, f"10.{i % 250}.{i % 7}.1", f"{i % 5000:032x}", f"{i % 9000:032x}", None,
        "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0", "Firefox", "120.0", "Linux", "",
        "Other", "", "pc", f"https://kdvonline.kz/p/{i % 300}", "https://ya.ru/", None,
        "KZ", "ALA", "Almaty", "c" * 16, "1", "web",
    )  # fmt: skip


async def _node(dsn: str, rows: int, batch: int) -> float:
    settings = load_settings(
        None, environ={"COLLECTOR_STORAGE_BACKEND": "postgres", "COLLECTOR_STORAGE_DSN": dsn}
    )
    storage = PostgresStorage(settings, aggregators(settings))
    await storage.open()
    now = int(time.time() * 1000)
    batches = [
        Batch(
            hits=[_row(i, now) for i in range(start, start + batch)],
            pixel_counts={(time.strftime("%Y-%m-%d"), f"/p/{start % 300}", "granted"): batch},
        )
        for start in range(0, rows, batch)
    ]
    started = time.perf_counter()
    for b in batches:
        await storage.write_batch(b)
    elapsed = time.perf_counter() - started
    await storage.close()
    return rows / elapsed


def _run(args: tuple[str, int, int]) -> float:
    return asyncio.run(_node(*args))


async def _schema(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--rows", type=int, default=100_000, help="rows per process")
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    schema = f"bench_{secrets.token_hex(4)}"
    asyncio.run(_schema(args.dsn, f"CREATE SCHEMA {schema}"))
    dsn = f"{args.dsn}{'&' if '?' in args.dsn else '?'}search_path={schema}"
    try:
        asyncio.run(_node(dsn, args.batch, args.batch))  # migrate once, outside the timing
        with multiprocessing.Pool(args.procs) as pool:
            started = time.perf_counter()
            per = pool.map(_run, [(dsn, args.rows, args.batch)] * args.procs)
            total = args.rows * args.procs / (time.perf_counter() - started)
    finally:
        asyncio.run(_schema(args.dsn, f"DROP SCHEMA {schema} CASCADE"))
    print(
        f"procs={args.procs} batch={args.batch} per-process rows/s="
        f"{', '.join(f'{p:,.0f}' for p in per)} total rows/s={total:,.0f}"
    )


if __name__ == "__main__":
    main()
