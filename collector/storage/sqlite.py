"""The embedded default store: one SQLite file in WAL mode, through aiosqlite.

Datasette's rule: one connection writes (the batch writer's), reads use their own. Each
batch is one ``BEGIN IMMEDIATE`` transaction with one ``executemany`` per table, so the
per-row Python work in aiosqlite's thread stays small (it competes with the event loop
for the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiosqlite

from collector.config import Settings
from collector.errors import StorageError
from collector.storage.base import HIT_COLUMNS, Aggregator, Batch, Dialect, HitRow, Statement
from collector.storage.migrations import migrations

logger = logging.getLogger(__name__)

_INSERT_HIT = (
    f"INSERT INTO hits ({', '.join(HIT_COLUMNS)}) VALUES ({', '.join('?' * len(HIT_COLUMNS))})"
)
# Pixel hits leave the app-collection columns (migration 0008) NULL. Binding 22 instead
# of 29 parameters, from plain tuples rather than ``HitRow`` named tuples (which the
# sqlite3 module reads item by item through the sequence protocol), halves the per-row
# cost of the insert without its indexes: 7.5 -> 3.9 us (docs/PERFORMANCE.md).
_PIXEL_WIDTH = HIT_COLUMNS.index("event_id")
_INSERT_PIXEL_HIT = (
    f"INSERT INTO hits ({', '.join(HIT_COLUMNS[:_PIXEL_WIDTH])}) "
    f"VALUES ({', '.join('?' * _PIXEL_WIDTH)})"
)
_pixel_part = itemgetter(slice(0, _PIXEL_WIDTH))
_app_part = itemgetter(slice(_PIXEL_WIDTH, None))
_NO_APP_FIELDS = (None,) * (len(HIT_COLUMNS) - _PIXEL_WIDTH)
_UPSERT_COUNT = (
    "INSERT INTO pixel_counts (day, path, consent, hits) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (day, path, consent) DO UPDATE SET hits = hits + excluded.hits"
)


def split_sql(script: str) -> list[str]:
    """Split a migration into statements (trigger bodies with ';' stay whole)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not current.strip().startswith("--"):
        statements.append(current.strip())
    return statements


def create_private_file(path: Path) -> None:
    """Create ``path`` with mode 0600 if missing (SQLite gives -wal/-shm the same mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


@runtime_checkable
class CachingAggregator(Protocol):
    """An aggregator that may leave out statements a process-local cache proves redundant.

    The cache is only as good as the database it describes: ``generation_sql`` reads a
    counter that every rewrite of the aggregate bumps (in any process), and the storage
    reads it inside each batch transaction. ``cached(batch, dialect, generation)``
    returns statements valid while ``generation`` is current, and a callable to run once
    they committed (to teach the cache what they wrote).
    """

    generation_sql: str

    def cached(
        self, batch: Batch, dialect: Dialect, generation: int
    ) -> tuple[list[Statement], Callable[[], None]]: ...

    def forget(self) -> None:
        """Empty the cache (the storage opened a database it may not describe)."""


def hit_inserts(hits: Sequence[HitRow]) -> list[Statement]:
    """The inserts for a batch's hits: pixel hits through the narrow statement."""
    if not hits:
        return []
    app = list(map(_app_part, hits))
    if app.count(_NO_APP_FIELDS) == len(app):
        return [(_INSERT_PIXEL_HIT, list(map(_pixel_part, hits)))]
    pixel = [h[:_PIXEL_WIDTH] for h, a in zip(hits, app, strict=True) if a == _NO_APP_FIELDS]
    full = [tuple(h) for h, a in zip(hits, app, strict=True) if a != _NO_APP_FIELDS]
    return [(sql, rows) for sql, rows in ((_INSERT_PIXEL_HIT, pixel), (_INSERT_HIT, full)) if rows]


class SQLiteStorage:
    """``Storage`` on one SQLite file."""

    def __init__(self, settings: Settings, aggregators: Sequence[Aggregator] = ()) -> None:
        self.settings = settings
        self.aggregators = tuple(aggregators)
        self.path = Path(settings.storage.path)
        self._write: aiosqlite.Connection | None = None
        self._read: aiosqlite.Connection | None = None
        # Governance writes (tokens, audit, blocks) get their own connection so they never
        # join, or roll back with, a hit batch; a lock keeps their transactions whole.
        self._admin: aiosqlite.Connection | None = None
        self._admin_lock = asyncio.Lock()
        self._caching = [a for a in self.aggregators if isinstance(a, CachingAggregator)]
        # The rewrite generation each caching aggregator's cache was last checked against.
        self._generations: dict[str, int] = {}

    async def _connect(self, *, readonly: bool) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute("PRAGMA busy_timeout = 5000")
        await conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            await conn.execute("PRAGMA query_only = ON")
        else:
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
            # Each batch dirties index pages all over the B-trees (random visitor ids
            # and IPs). A 12 MiB page cache keeps the hot ones in memory, and
            # checkpointing every ~40 MB of WAL instead of 4 MB writes a page that several
            # batches touched once: -25% CPU per stored row (docs/PERFORMANCE.md). 32 MiB
            # saved ~4% of the writer's CPU and cost it 16 MB of RSS; 12 against 16 MiB
            # measured no difference and pays for the larger batches (4 MB).
            await conn.execute("PRAGMA cache_size = -12288")
            await conn.execute("PRAGMA wal_autocheckpoint = 10000")
        return conn

    async def open(self) -> None:
        if self._write is not None:
            return
        try:
            if not self.path.parent.is_dir():
                raise StorageError(f"storage.path: directory {self.path.parent} does not exist")
            create_private_file(self.path)
            self._write = await self._connect(readonly=False)
            await self._migrate(self._write)
            for aggregate in self._caching:
                aggregate.forget()
            self._generations = await self._read_generations(self._write)
            self._read = await self._connect(readonly=True)
            self._read.row_factory = sqlite3.Row
            self._admin = await self._connect(readonly=False)
            self._admin.row_factory = sqlite3.Row
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from exc

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for number, name, sql in migrations("sqlite"):
            # Several workers may start at once: BEGIN IMMEDIATE serialises them and the
            # version is re-read inside the transaction.
            await conn.execute("BEGIN IMMEDIATE")
            try:
                async with conn.execute(
                    "SELECT 1 FROM schema_version WHERE version = ?", (number,)
                ) as cur:
                    applied = await cur.fetchone()
                if not applied:
                    for statement in split_sql(sql):
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO schema_version VALUES (?, ?, datetime('now'))",
                        (number, name),
                    )
                    logger.info("applied migration %04d_%s", number, name)
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        for attr in ("_read", "_admin", "_write"):
            conn = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                try:
                    await conn.close()
                except sqlite3.Error:  # pragma: no cover - closing a broken file
                    logger.exception("closing %s connection failed", attr)

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._write is None:
            raise StorageError("storage is not open")
        return self._write

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._read is None:
            raise StorageError("storage is not open")
        return self._read

    def _statements(
        self, batch: Batch, generations: dict[str, int]
    ) -> tuple[list[Statement], list[Callable[[], None]]]:
        out = hit_inserts(batch.hits)
        if batch.pixel_counts:
            out.append((_UPSERT_COUNT, [(*key, n) for key, n in batch.pixel_counts.items()]))
        committed: list[Callable[[], None]] = []
        for aggregate in self.aggregators:
            if isinstance(aggregate, CachingAggregator):
                found, done = aggregate.cached(
                    batch, "sqlite", generations.get(aggregate.generation_sql, -1)
                )
                committed.append(done)
            else:
                found = list(aggregate(batch, "sqlite"))
            out += [(sql, params) for sql, params in found if params]
        return out, committed

    async def _read_generations(self, conn: aiosqlite.Connection) -> dict[str, int]:
        found: dict[str, int] = {}
        for sql in {a.generation_sql for a in self._caching}:
            async with conn.execute(sql) as cur:
                row = await cur.fetchone()
            found[sql] = int(row[0]) if row else 0
        return found

    async def write_batch(self, batch: Batch) -> None:
        conn = self.writer
        # Pre-aggregating a batch is several us of Python per hit; in a worker thread the
        # GIL switch interval lets the event loop answer pixels meanwhile (p99), where
        # running it inline stalled the loop for the whole batch.
        assumed = self._generations
        if self.aggregators:
            statements, committed = await asyncio.to_thread(self._statements, batch, assumed)
        else:
            statements, committed = self._statements(batch, assumed)
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                if self._caching:
                    current = await self._read_generations(conn)
                    if current != assumed:
                        # Another connection or process rewrote aggregates since the
                        # caches were last checked: prepare again under the new
                        # generation (the caches start empty).
                        self._generations = assumed = current
                        statements, committed = await asyncio.to_thread(
                            self._statements, batch, current
                        )
                for sql, params in statements:
                    await conn.executemany(sql, params)
                await conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"writing {len(batch)} hits failed: {exc}") from exc
        for done in committed:
            done()

    async def ping(self) -> bool:
        try:
            async with self.reader.execute("SELECT 1") as cur:
                return (await cur.fetchone()) is not None
        except (sqlite3.Error, StorageError, ValueError):
            return False

    async def schema_version(self) -> int:
        async with self.reader.execute("SELECT max(version) FROM schema_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a read query on the read connection (APIs and CLI); rows as dicts."""
        return await _fetch_all(self.reader, sql, params)

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        found = await self.fetch_all(sql, params)
        return found[0] if found else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement in its own transaction on the admin connection; the row count."""
        async with self.transaction() as tx:
            return await tx.execute(sql, params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SQLiteTx]:
        """A write transaction on the admin connection (BEGIN IMMEDIATE ... COMMIT)."""
        if self._admin is None:
            raise StorageError("storage is not open")
        conn = self._admin
        async with self._admin_lock:
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot start a transaction: {exc}") from exc
            try:
                yield SQLiteTx(conn)
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            try:
                await conn.execute("COMMIT")
            except sqlite3.Error as exc:
                await conn.execute("ROLLBACK")
                raise StorageError(f"commit failed: {exc}") from exc


async def _fetch_all(
    conn: aiosqlite.Connection, sql: str, params: Sequence[Any]
) -> list[dict[str, Any]]:
    try:
        async with conn.execute(sql, tuple(params)) as cur:
            return [dict(row) for row in await cur.fetchall()]
    except sqlite3.Error as exc:
        raise StorageError(f"query failed: {exc}") from exc


class SQLiteTx:
    """Statements inside one ``SQLiteStorage.transaction()``."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await _fetch_all(self._conn, sql, params)

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        found = await self.fetch_all(sql, params)
        return found[0] if found else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            async with self._conn.execute(sql, tuple(params)) as cur:
                return int(cur.rowcount)
        except sqlite3.Error as exc:
            raise StorageError(f"statement failed: {exc}") from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._conn.executemany(sql, [tuple(r) for r in rows])
        except sqlite3.Error as exc:
            raise StorageError(f"statement failed: {exc}") from exc
