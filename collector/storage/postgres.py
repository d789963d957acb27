"""The scale-out store: PostgreSQL through an asyncpg pool, for several collector nodes.

A batch is one transaction: hits by binary COPY into the day-partitioned ``hits`` table,
then the ``pixel_counts`` upsert, then every aggregator's statements. Upserts
(``INSERT ... ON CONFLICT DO UPDATE SET n = t.n + excluded.n``) add under the row lock,
so counts stay exact when several nodes write the same keys at once; rows are sorted
before they are sent so two nodes take those locks in the same order (no deadlocks in
the common case, and a deadlock that still happens is retried here).

Portable SQL arrives with ``?`` placeholders and is rewritten to ``$1..$n``. A ``?``
inside a quoted literal or identifier is left alone; our SQL never uses PostgreSQL's
JSON ``?`` operators, so every other ``?`` is a parameter.

Connection failures raise ``DatabaseUnreachable`` (the spool's cue, see spool.py); any
other failure raises ``StorageError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import asyncpg

from collector.config import Settings
from collector.errors import DatabaseUnreachable, StorageError
from collector.storage import pg_partitions
from collector.storage.base import HIT_COLUMNS, Aggregator, Batch
from collector.storage.migrations import migrations

logger = logging.getLogger(__name__)

_MIGRATE_LOCK = 0x636F6C6C_6D696772  # "collmigr": one node migrates, the others wait
# Every storage.transaction() holds this lock, like SQLite's BEGIN IMMEDIATE: governance
# writes that read then write (the audit chain's last hash, 5.5) stay whole across nodes.
ADMIN_LOCK = 0x636F6C6C_61646D6E  # "colladmn"
_UPSERT_COUNT = (
    "INSERT INTO pixel_counts (day, path, consent, hits) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (day, path, consent) DO UPDATE SET hits = pixel_counts.hits + excluded.hits"
)
_RETRIES = 3  # deadlock / serialization failures retried inside write_batch


@functools.lru_cache(maxsize=1024)
def to_dollar(sql: str) -> str:
    """Rewrite ``?`` placeholders to ``$1..$n``, leaving quoted text untouched."""
    out: list[str] = []
    quote: str | None = None
    n = 0
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            n += 1
            out.append(f"${n}")
            continue
        out.append(ch)
    return "".join(out)


def _plain(value: Any) -> Any:
    # sum() over BIGINT is NUMERIC in PostgreSQL; SQLite gives an int. Keep callers
    # backend-neutral: integral decimals become int, the rest float.
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _dict(record: asyncpg.Record) -> dict[str, Any]:
    return {key: _plain(value) for key, value in record.items()}


def _rowcount(status: str) -> int:
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _sort_key(row: Sequence[Any]) -> tuple[tuple[bool, str], ...]:
    return tuple((value is None, str(value)) for value in row)


def _unreachable(exc: BaseException) -> bool:
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.TooManyConnectionsError
        | asyncpg.exceptions.ConnectionDoesNotExistError
        # A pooled connection the server dropped mid-operation (shutdown under load)
        # fails its next BEGIN with "cannot switch to state ..; another operation is in
        # progress". It is the connection's loss, not our bug: spool, do not drop.
        | asyncpg.exceptions.InternalClientError,
    ) or (isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc).lower())


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Translate driver errors into ours; connection loss becomes DatabaseUnreachable."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if _unreachable(exc):
            raise DatabaseUnreachable(f"PostgreSQL unreachable ({what}): {exc}") from exc
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            raise StorageError(f"{what} failed: {exc}") from exc
        raise


class PostgresStorage:
    """``Storage`` on one PostgreSQL database, shared by any number of collector nodes."""

    dialect = "postgres"

    def __init__(self, settings: Settings, aggregators: Sequence[Aggregator] = ()) -> None:
        self.settings = settings
        self.aggregators = tuple(aggregators)
        self._pool: asyncpg.Pool | None = None
        self._days: set[int] = set()
        self._ahead_from = -1  # the day for which partitions ahead were last ensured

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("storage is not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is not None:
            return
        s = self.settings.storage
        timeout = s.connect_timeout_ms / 1000
        with _errors("connecting"):
            self._pool = await asyncpg.create_pool(
                s.dsn,
                min_size=1,
                max_size=s.pool_size,
                timeout=timeout,
                command_timeout=max(timeout, 30.0),
                server_settings={"application_name": "collector"},
            )
        try:
            async with self.pool.acquire() as conn:
                await self._migrate(conn)
                self._days = await pg_partitions.existing_days(conn)
            await self._ensure_ahead()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        # A session advisory lock: nodes starting together queue here, and each re-reads
        # the applied versions once it holds the lock, so every migration runs once.
        with _errors("migrating"):
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATE_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                    "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                applied = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
                for number, name, sql in migrations("postgres"):
                    if number in applied:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                            number,
                            name,
                        )
                    logger.info("applied migration %04d_%s", number, name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATE_LOCK)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()

    # --- partitions -----------------------------------------------------------------

    async def _ensure_ahead(self) -> None:
        today = pg_partitions.day_of(int(time.time() * 1000))
        if today == self._ahead_from:
            return
        ahead = range(today - 1, today + self.settings.storage.partition_days_ahead + 1)
        await self._ensure_days(ahead)
        self._ahead_from = today

    async def _ensure_days(self, days: Iterable[int]) -> None:
        missing = set(days) - self._days
        if missing:
            with _errors("creating partitions"):
                async with self.pool.acquire() as conn:
                    self._days = await pg_partitions.create_days(conn, missing)

    async def drop_partitions_before(self, ts_ms: int) -> int:
        """Retention hook (5.1): drop whole days of hits older than ``ts_ms``.

        Returns how many daily partitions were dropped; rows of the day holding ``ts_ms``
        are left for the caller's ``DELETE ... WHERE ts_ms < ?``.
        """
        with _errors("dropping partitions"):
            async with self.pool.acquire() as conn:
                dropped = await pg_partitions.drop_before(conn, ts_ms)
                self._days = await pg_partitions.existing_days(conn)
        return dropped

    # --- the batch ------------------------------------------------------------------

    async def write_batch(self, batch: Batch) -> None:
        await self._ensure_ahead()
        if batch.hits:
            await self._ensure_days({pg_partitions.day_of(h.ts_ms) for h in batch.hits})
        # Pre-aggregation is Python work per hit: off the event loop (see sqlite.py).
        statements = await asyncio.to_thread(self._statements, batch)
        for attempt in range(_RETRIES):
            try:
                with _errors(f"writing {len(batch)} hits"):
                    async with self.pool.acquire() as conn, conn.transaction():
                        if batch.hits:
                            await conn.copy_records_to_table(
                                "hits", records=batch.hits, columns=HIT_COLUMNS
                            )
                        for sql, rows in statements:
                            await conn.executemany(sql, rows)
                return
            except StorageError as exc:
                cause = exc.__cause__
                retry = isinstance(
                    cause, asyncpg.DeadlockDetectedError | asyncpg.SerializationError
                )
                if isinstance(cause, asyncpg.CheckViolationError) and "partition" in str(cause):
                    # Another node's retention dropped a partition we thought existed.
                    async with self.pool.acquire() as conn:
                        self._days = await pg_partitions.existing_days(conn)
                    await self._ensure_days({pg_partitions.day_of(h.ts_ms) for h in batch.hits})
                    retry = True
                if not retry or attempt == _RETRIES - 1:
                    raise
                logger.warning("batch write conflicted (%s); retrying", cause)

    async def holds(self, batch: Batch) -> bool:
        """Whether ``batch`` is stored already (it is one transaction: its first hit tells).

        For a batch whose write broke off with the connection: PostgreSQL may have
        committed it before the answer was lost. A batch without hits cannot tell, and
        is taken as not stored.
        """
        if not batch.hits:
            return False
        first = batch.hits[0]
        with _errors("looking for a spooled batch"):
            async with self.pool.acquire() as conn:
                found = await conn.fetchval(
                    "SELECT 1 FROM hits WHERE visitor_id = $1 AND ts_ms = $2 AND session_id = $3"
                    " AND page_url IS NOT DISTINCT FROM $4 LIMIT 1",
                    first.visitor_id,
                    first.ts_ms,
                    first.session_id,
                    first.page_url,
                )
        return found is not None

    def _statements(self, batch: Batch) -> list[tuple[str, list[tuple[Any, ...]]]]:
        out: list[tuple[str, list[tuple[Any, ...]]]] = []
        if batch.pixel_counts:
            out.append((_UPSERT_COUNT, sorted((*k, n) for k, n in batch.pixel_counts.items())))
        for aggregate in self.aggregators:
            for sql, rows in aggregate(batch, "postgres"):
                if rows:
                    out.append((to_dollar(sql), sorted(map(tuple, rows), key=_sort_key)))
        return out

    # --- generic access -------------------------------------------------------------

    async def settle_deletes(self) -> bool:
        """Nothing to do from here: PostgreSQL's deleted tuples stay in their pages until
        VACUUM frees the space and new rows overwrite it (docs/PRIVACY.md)."""
        return False

    async def ping(self) -> bool:
        if self._pool is None:
            return False
        try:
            async with self._pool.acquire(timeout=2) as conn:
                return bool(await conn.fetchval("SELECT 1", timeout=2) == 1)
        except Exception:  # any failure means "not answering"; the reason is in the logs
            return False

    async def schema_version(self) -> int:
        row = await self.fetch_one("SELECT max(version) AS v FROM schema_version")
        return int(row["v"]) if row and row["v"] is not None else 0

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with _errors("query"):
            async with self.pool.acquire() as conn:
                return [_dict(r) for r in await conn.fetch(to_dollar(sql), *params)]

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        found = await self.fetch_all(sql, params)
        return found[0] if found else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self.transaction() as tx:
            return await tx.execute(sql, params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        """A write transaction holding the cluster-wide admin lock (see ``ADMIN_LOCK``)."""
        with _errors("transaction"):
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", ADMIN_LOCK)
                yield PostgresTx(conn)


class PostgresTx:
    """Statements inside one ``PostgresStorage.transaction()``."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with _errors("query"):
            return [_dict(r) for r in await self._conn.fetch(to_dollar(sql), *params)]

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        found = await self.fetch_all(sql, params)
        return found[0] if found else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with _errors("statement"):
            return _rowcount(await self._conn.execute(to_dollar(sql), *params))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with _errors("statement"):
            await self._conn.executemany(to_dollar(sql), [tuple(r) for r in rows])
