"""Two real collector nodes against one PostgreSQL: every hit and every count exact.

The load is deterministic (visitors, IPs, pages), so the same requests sent through one
in-process node on SQLite give the reference: each aggregate table (rollups, per-IP
statistics and whatever else the migrations add) must sum to the same numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.app import create_app
from collector.storage import open_storage
from tests.conftest import Server, client_for, make_settings
from tests.test_server import cookie_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N = 400
# rollup_state holds each store's marks of its own progress (the rewrite generation,
# SQLite's highest hit id with its hours noted), not counts.
NOT_AGGREGATES = {"hits", "schema_version", "api_tokens", "audit_log", "blocks", "rollup_state"}
# Columns whose sums depend on when the test ran, not on what was sent.
_TIME_WORDS = {"id", "ms", "at", "ts", "hour", "day", "minute", "week", "month", "bucket"}


def request_for(i: int) -> tuple[dict[str, str], dict[str, str]]:
    visitor = f"{i % 37:032x}"
    headers = {
        "cookie": f"{cookie_for()}; kdv_vid={visitor}",
        "x-forwarded-for": f"192.0.2.{i % 23}",
        "user-agent": f"Mozilla/5.0 (X11; Linux x86_64; rv:{100 + i % 5}.0) Gecko Firefox",
    }
    return headers, {"u": f"https://s.kz/p/{i % 11}", "r": "https://ya.ru/"}


async def send(client: httpx.AsyncClient, indices: range) -> None:
    for i in indices:
        headers, params = request_for(i)
        resp = await client.get("/p.gif", headers=headers, params=params)
        assert resp.status_code == 200


async def aggregate_sums(storage: Any, tables: dict[str, list[str]]) -> dict[str, Any]:
    sums: dict[str, Any] = {}
    for table, columns in tables.items():
        if not columns:
            continue
        row = await storage.fetch_one(
            "SELECT "
            + ", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in columns)
            + f" FROM {table}"
        )
        sums[table] = row
    return sums


async def test_two_nodes_one_database_exact_counts(
    serve: Callable[..., Server], tmp_path: Path, pg_dsn: str
) -> None:
    env = {
        "COLLECTOR_STORAGE_BACKEND": "postgres",
        "COLLECTOR_STORAGE_DSN": pg_dsn,
        "COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": "20",
        "COLLECTOR_STORAGE_BATCH_SIZE": "50",  # many small batches: many concurrent upserts
        "COLLECTOR_SERVER_TRUSTED_PROXIES": "127.0.0.1/32",
        # Two nodes start at once on a 2-core machine that also runs the suite: a first
        # connection may take longer than the default 5 s (seen once in CI).
        "COLLECTOR_STORAGE_CONNECT_TIMEOUT_MS": "30000",
    }
    nodes = [
        serve(env={**env, "COLLECTOR_STORAGE_SPOOL_DIR": str(tmp_path / f"spool{n}")})
        for n in range(2)
    ]
    clients = [httpx.AsyncClient(base_url=node.url, timeout=10) for node in nodes]
    try:
        # 8 connections, alternating between the nodes, each a slice of the N requests
        await asyncio.gather(*(send(clients[k % 2], range(k, N, 8)) for k in range(8)))
    finally:
        for c in clients:
            await c.aclose()
    for node in nodes:
        node.stop()  # drains its writer

    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    reference = create_app(make_settings(ref_dir, server={"trusted_proxies": ("127.0.0.1/32",)}))
    async with reference.lifespan(reference.starlette), client_for(reference, "127.0.0.1") as c:
        await send(c, range(N))
        await reference.writer.flush()

    settings = make_settings(tmp_path, storage={"backend": "postgres", "dsn": pg_dsn})
    pg = open_storage(settings)
    await pg.open()
    try:
        hits = await pg.fetch_one(
            "SELECT count(*) AS n, count(DISTINCT visitor_id) AS visitors, "
            "count(DISTINCT ip) AS ips FROM hits"
        )
        assert hits == {"n": N, "visitors": 37, "ips": 23}
        found = await pg.fetch_all(
            "SELECT c.table_name AS t, c.column_name AS c FROM information_schema.columns c "
            "JOIN information_schema.tables t ON t.table_schema = c.table_schema "
            "AND t.table_name = c.table_name "
            "WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' "
            "AND c.data_type IN ('bigint', 'integer', 'smallint') "
            "AND c.table_name NOT LIKE 'hits_p%' ORDER BY 1, 2"
        )
        tables: dict[str, list[str]] = {}
        for r in found:
            if r["t"] in NOT_AGGREGATES:
                continue
            columns = tables.setdefault(r["t"], [])
            # Bitmaps (vbits) are merged by OR, not added: their sums overflow and mean nothing.
            if not set(r["c"].split("_")) & _TIME_WORDS and r["c"] != "vbits":
                columns.append(r["c"])
        assert "pixel_counts" in tables
        two_nodes = await aggregate_sums(pg, tables)
        ref = open_storage(reference.settings)
        await ref.open()
        one_node = await aggregate_sums(ref, tables)
        await ref.close()
        print(f"checked aggregate tables: {sorted(two_nodes)}")
        assert two_nodes == one_node
        assert two_nodes["pixel_counts"] == {"hits": N}
    finally:
        await pg.close()
