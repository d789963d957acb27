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
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from collector.config import Settings
from collector.errors import StorageError
from collector.storage.base import (
    HIT_COLUMNS,
    AggregateWindow,
    Aggregator,
    Batch,
    HitRow,
    Statement,
    WindowedAggregator,
)
from collector.storage.driver import connect, sqlite3
from collector.storage.migrations import migrations
from collector.storage.sqlite_inserts import hit_inserts
from collector.subject_hours import SET_PENDING_FROM, note_hours
from collector.visibility import VISIBLE

logger = logging.getLogger(__name__)


_BUSY_TIMEOUT_MS = 5000  # every connection waits this long for another's lock
PAGE_SIZE = 16_384  # bytes, for files this store creates (``_connect``)
_CACHE_KIB = 4096  # the page cache of each writing connection
_CHECKPOINT_BYTES = 40 * 1024 * 1024  # of WAL between automatic checkpoints
# settle_deletes: how long one TRUNCATE checkpoint may hold the write lock waiting for
# readers, and how many it tries (writers get in between).
_SETTLE_WAIT_MS = 250
_SETTLE_ATTEMPTS = 4

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


_STRAYS_CHUNK = 100_000  # ids of hits stored elsewhere noted per transaction at open
# The writer process notes the hours of its hits (collector.subject_hours) once this many
# are stored, or at the first batch after _NOTE_AGE_S, in one statement per table over all
# of them: a new address's pair goes to a random page of ip_hours (a new visitor's went to
# one of visitor_hours until migration 0017), and one batch at a time each of them
# dirtied a page of its own. With 640,000 hits stored, noting 32 batches of 2,000 at once
# took a batch of new visitors from 30 to 13 us of CPU a hit (docs/PERFORMANCE.md,
# session 12). 32,768 measured as fast as 65,536 and its sort holds half the memory
# (~2 MB of the writer's RSS). Until then the hits are found all the same: every lookup
# notes the hits above the mark first (``subject_hours.catch_up``).
_NOTE_HITS = 32_768
_NOTE_AGE_S = 30.0  # checked when a batch comes: no timer (lookups note anyway)
_IDLE_S = 0.5  # a window nothing follows for this long ends on its own
# The most hits a window sums: what 4 batches of 8,000 held before windows could last 2 s
# and 8 batches. Its dicts, and the rows a catch-up re-reads, grow with it (RSS budget).
_MAX_WINDOW_HITS = 32_000
_ADD_PENDING = "INSERT INTO aggregate_pending (first_id, last_id) VALUES (?, ?)"
_COUNT_PENDING = "SELECT count(*) FROM aggregate_pending"
_CATCH_UP_PAGE = 5000
_PENDING_HITS = (
    f"SELECT id, {', '.join(HIT_COLUMNS)} FROM hits WHERE id > ? AND id <= ? AND {VISIBLE} "
    f"ORDER BY id LIMIT {_CATCH_UP_PAGE}"
)


class _Window:
    """Aggregates summed over consecutive batches (see ``SQLiteStorage.write_batch``)."""

    __slots__ = ("batches", "generations", "hits", "parts", "ranges", "started")

    def __init__(self, generations: dict[str, int], parts: list[AggregateWindow]) -> None:
        self.generations = generations  # as read when it began: its sums assume them
        self.parts = parts
        self.batches = 0  # kept back so far
        self.hits = 0  # in the batches kept back
        self.ranges = 0  # rows it put in aggregate_pending
        self.started = time.monotonic()

    def add(self, hits: Sequence[HitRow]) -> None:
        for part in self.parts:
            part.add(hits)

    def statements(self) -> tuple[list[Statement], list[Callable[[], None]]]:
        out: list[Statement] = []
        committed: list[Callable[[], None]] = []
        for part in self.parts:
            found, done = part.statements()
            out += [(sql, params) for sql, params in found if params]
            committed.append(done)
        return out, committed


async def _max_id(conn: aiosqlite.Connection) -> int:
    async with conn.execute("SELECT coalesce(max(id), 0) FROM hits") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping id ranges merged (ids of erased rows can be used again)."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def _hit_row(row: Sequence[Any]) -> HitRow:
    return HitRow(*row[1:])


class SQLiteStorage:
    """``Storage`` on one SQLite file."""

    def __init__(
        self,
        settings: Settings,
        aggregators: Sequence[Aggregator] = (),
        *,
        sole_writer: bool = False,
    ) -> None:
        self.settings = settings
        self.aggregators = tuple(aggregators)
        # Windows span batches only in a process that is the file's one writer (the
        # writer process): see ``write_batch``.
        self._sole = sole_writer
        self.window_batches = settings.storage.aggregate_batches if sole_writer else 1
        # A window that began this long ago ends, with the next batch or on a timer.
        self.window_age_s = settings.storage.aggregate_max_age_ms / 1000
        self.path = Path(settings.storage.path)
        self._write: aiosqlite.Connection | None = None
        self._read: aiosqlite.Connection | None = None
        # Governance writes (tokens, audit, blocks) get their own connection so they never
        # join, or roll back with, a hit batch; a lock keeps their transactions whole.
        self._admin: aiosqlite.Connection | None = None
        self._admin_lock = asyncio.Lock()
        self._windowed = [a for a in self.aggregators if isinstance(a, WindowedAggregator)]
        self._plain = [a for a in self.aggregators if not isinstance(a, WindowedAggregator)]
        # The rewrite generation each windowed aggregator's cache was last checked against.
        self._generations: dict[str, int] = {}
        self._window: _Window | None = None
        # Ranges in ``aggregate_pending`` that no window of ours holds (left by a writer
        # that died, or by a window we had to drop): the next write aggregates them.
        self._catch_up = False
        self._batch_lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        # The id ranges of our hits whose hours are not noted yet, and since when (the
        # writer process only: ``_NOTE_HITS``).
        self._unnoted: list[tuple[int, int]] = []
        self._unnoted_since = 0.0
        self._idle_tasks: set[asyncio.Task[None]] = set()

    async def _connect(self, *, readonly: bool) -> aiosqlite.Connection:
        path = self.path
        # aiosqlite's own ``connect`` calls ``sqlite3.connect`` without secure_delete;
        # the driver's ``connect`` sets it (driver.py).
        conn = aiosqlite.Connection(lambda: connect(path, isolation_level=None), iter_chunk_size=64)
        await conn
        await conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            await conn.execute("PRAGMA query_only = ON")
        else:
            # Fixed when the file is created, before WAL mode writes its header; a file
            # made with another size keeps it. With the hours tables noted in bulk, 16 KiB
            # pages stored 12-22% more hits per CPU second into a new store and 1-5% more
            # into a grown one and on the aggregating path (docs/PERFORMANCE.md, session
            # 12; session 7 measured them dearer, when each batch dirtied random pages).
            await conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
            # Checkpointing every ~40 MiB of WAL instead of 4 writes a page that several
            # batches touched once: -25% CPU per stored row (docs/PERFORMANCE.md), counted
            # in pages of the file's own size. The page cache: 32 MiB saved ~4% of the
            # writer's CPU and cost it 16 MB of RSS; 12 against 16 MiB, and 8 against 12
            # (session 5), measured no difference beyond the noise. Since the hours are
            # noted in bulk, batches no longer dirty random pages all over the hours
            # tables, and 4 MiB measured within the noise of 8 (-9% to +3%, session 12):
            # 3-4 MB of RSS back.
            await conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            async with conn.execute("PRAGMA page_size") as cur:
                row = await cur.fetchone()
            pages = _CHECKPOINT_BYTES // int(row[0] if row else PAGE_SIZE)
            await conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
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
            for aggregate in self._windowed:
                aggregate.forget()
            await self._note_strays_now(self._write)
            self._generations = await self._read_generations(self._write)
            if self._sole:
                async with self._write.execute("SELECT 1 FROM aggregate_pending LIMIT 1") as c:
                    self._catch_up = await c.fetchone() is not None
            self._read = await self._connect(readonly=True)
            self._read.row_factory = sqlite3.Row
            self._admin = await self._connect(readonly=False)
            self._admin.row_factory = sqlite3.Row
        except StorageError:
            await self.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from exc
        if self._catch_up:
            # The writer before us died with a window open: its hits are stored, their
            # aggregates are made now from the rows (a failure leaves it to the next batch).
            try:
                await self.write_batch(Batch())
            except StorageError as exc:
                logger.error("catching up pending aggregates failed: %s", exc.detail)

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        known = migrations("sqlite")
        async with conn.execute("SELECT max(version) FROM schema_version") as cur:
            row = await cur.fetchone()
        if row and row[0] is not None and int(row[0]) > known[-1][0]:
            # An older collector would write to a schema it does not know: since 0016,
            # one that would store hits without noting their hours.
            raise StorageError(
                f"{self.path} has schema version {row[0]}, newer than this collector's "
                f"{known[-1][0]}: a newer collector wrote it; run that one"
            )
        for number, name, sql in known:
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
        # Under the batch lock: a window end the idle timer started may be waiting for it,
        # and finds the storage closed (``_end_window``) instead of closed connections.
        async with self._batch_lock:
            if self._write is not None and (self._window is not None or self._catch_up):
                try:
                    await self._write_batch(Batch())  # the window's aggregates, before we go
                except StorageError as exc:
                    logger.error("aggregates left for the next start to catch up: %s", exc.detail)
            await self._note_unnoted()
            for attr in ("_read", "_admin", "_write"):
                conn = getattr(self, attr)
                setattr(self, attr, None)
                if conn is not None:
                    try:
                        await conn.close()
                    except sqlite3.Error:  # pragma: no cover - closing a broken file
                        logger.exception("closing %s connection failed", attr)
            if self._idle is not None:  # the idle end, maybe set by a batch before us
                self._idle.cancel()
                self._idle = None

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

    def _new_window(self, generations: dict[str, int]) -> _Window:
        parts = [a.window(generations.get(a.generation_sql, -1)) for a in self._windowed]
        return _Window(generations, parts)

    def _batch_statements(self, batch: Batch, window: _Window) -> list[Statement]:
        """The batch's own statements; its hits go into ``window``'s aggregates."""
        out = hit_inserts(batch.hits)
        if batch.pixel_counts:
            out.append((_UPSERT_COUNT, [(*key, n) for key, n in batch.pixel_counts.items()]))
        for aggregate in self._windowed:
            out += [(sql, params) for sql, params in aggregate.per_batch(batch) if params]
        for plain in self._plain:
            out += [(sql, params) for sql, params in plain(batch, "sqlite") if params]
        if batch.hits:
            window.add(batch.hits)
        return out

    async def _read_generations(self, conn: aiosqlite.Connection) -> dict[str, int]:
        found: dict[str, int] = {}
        for sql in {a.generation_sql for a in self._windowed}:
            async with conn.execute(sql) as cur:
                row = await cur.fetchone()
            found[sql] = int(row[0]) if row else 0
        return found

    async def write_batch(self, batch: Batch) -> None:
        """Store ``batch`` in one transaction, with its aggregates or keeping them back.

        The aggregates (rollups, IP statistics) are summed in a ``_Window``. Normally
        each batch is its own window. In the writer process, the file's one writer, a
        batch that allows it (``batch.hold``: nobody waits on a flush) leaves its
        aggregates in the window for the next batches, up to ``storage.aggregate_batches``
        batches, ``_MAX_WINDOW_HITS`` hits and ``storage.aggregate_max_age_ms`` (2 s): keys
        repeat across batches, so a window costs less per hit than its batches would
        alone. A window ends at its age even if no batch follows, so the aggregates lag
        the hits by that age and one write at most.
        Kept-back batches record their id range in ``aggregate_pending`` in their own
        transaction; the window's end writes the aggregates and deletes the ranges in
        one transaction. So a crash loses no aggregate (the next writer aggregates the
        ranges from the raw rows), and a rebuild meanwhile leaves those hits to us
        (``visibility.AGGREGATED``). When a rewrite moved the generation (a rebuild, an
        erasure, retention), the window is dropped and its ranges are aggregated from
        the raw rows as they now are. A window with nothing after it ends within
        ``_IDLE_S`` or at ``close``.
        """
        async with self._batch_lock:
            await self._write_batch(batch)

    async def _write_batch(self, batch: Batch) -> None:
        conn = self.writer
        window = self._window or self._new_window(self._generations)
        # A window that must first catch up ends now, so pending ranges stay few.
        keep_back = (
            batch.hold
            and not self._catch_up
            and window.batches + 1 < self.window_batches
            and window.hits + len(batch.hits) < _MAX_WINDOW_HITS
            and time.monotonic() - window.started < self.window_age_s
        )
        # Pre-aggregating a batch is several us of Python per hit; in a worker thread the
        # GIL switch interval lets the event loop answer pixels meanwhile (p99), where
        # running it inline stalled the loop for the whole batch.
        statements, ended = await asyncio.to_thread(self._prepare, batch, window, keep_back)
        current = self._generations
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                if self._windowed:
                    current = await self._read_generations(conn)
                first = await _max_id(conn) + 1
                for sql, params in statements:
                    await conn.executemany(sql, params)
                last = await _max_id(conn)
                unnoted = self._unnoted
                if last >= first:  # in id order: reused ids may come below earlier ones
                    unnoted = _union([*unnoted, (first, last)])
                noting = self._hours_due(unnoted)
                if noting:  # read back from the rows just written (collector.subject_hours)
                    await note_hours(SQLiteTx(conn), last, unnoted)
                elif last >= first:  # lookups note from there meanwhile (kept if set)
                    await conn.execute(SET_PENDING_FROM, (first,))
                stale = self._catch_up or current != window.generations
                if keep_back:
                    if last >= first:
                        await conn.execute(_ADD_PENDING, (first, last))
                        window.ranges += 1
                else:
                    if not stale and window.ranges:
                        # Another writer's catch-up may have taken our ranges (a topology
                        # we do not run, but then our sums would count twice).
                        async with conn.execute(_COUNT_PENDING) as cur:
                            row = await cur.fetchone()
                        stale = row is None or row[0] != window.ranges
                    if stale:
                        window = await self._caught_up(conn, current, (first, last))
                        ended = await asyncio.to_thread(window.statements)
                    assert ended is not None
                    for sql, params in ended[0]:
                        await conn.executemany(sql, params)
                    if self._sole:
                        await conn.execute("DELETE FROM aggregate_pending")
                await conn.execute("COMMIT")
            except BaseException:
                # This batch's hits may be in the window's sums but not in the file; the
                # ranges of the batches kept back before it are made from the rows.
                self._window = None
                self._catch_up = self._sole
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"writing {len(batch)} hits failed: {exc}") from exc
        self._generations = current
        if noting or not self._unnoted:
            self._unnoted_since = time.monotonic()
        self._unnoted = [] if noting else unnoted
        if keep_back:
            if stale:  # the sums are void; the ranges are aggregated from the rows later
                self._window, self._catch_up = None, True
            else:
                window.batches += 1
                window.hits += len(batch.hits)
                self._window = window
            self._end_when_idle()
            return
        self._window, self._catch_up = None, False
        assert ended is not None
        for done in ended[1]:
            done()

    def _hours_due(self, unnoted: list[tuple[int, int]]) -> bool:
        """Whether this batch notes the hours: every batch, but in the writer process
        only once ``_NOTE_HITS`` hits or ``_NOTE_AGE_S`` seconds are waiting."""
        if not self._sole:
            return True
        waiting = sum(last - first + 1 for first, last in unnoted)
        return waiting >= _NOTE_HITS or (
            bool(self._unnoted) and time.monotonic() - self._unnoted_since >= _NOTE_AGE_S
        )

    async def _note_unnoted(self) -> None:
        """At close: the hours of our hits not noted yet, so the next open finds none."""
        if not self._unnoted or self._write is None:
            return
        try:
            async with _immediate(self._write) as tx:
                await note_hours(tx, await _max_id(self._write), self._unnoted)
        except (sqlite3.Error, StorageError) as exc:  # the next open or lookup notes them
            logger.error("noting the hours of stored hits at close failed: %s", exc)
            return
        self._unnoted = []

    async def _note_strays_now(self, conn: aiosqlite.Connection) -> None:
        """At open: the hours of hits another writer stored (``note_hours``), before
        anyone looks a subject up through this process. A transaction per
        ``_STRAYS_CHUNK`` ids: a long backlog (an older version that ran for days) must
        not hold the write lock past another process's busy timeout."""
        while True:
            async with _immediate(conn) as tx:
                top = await _max_id(conn)
                upto = await note_hours(tx, top, most=_STRAYS_CHUNK)
            if upto >= top:
                return

    def _prepare(
        self, batch: Batch, window: _Window, keep_back: bool
    ) -> tuple[list[Statement], tuple[list[Statement], list[Callable[[], None]]] | None]:
        statements = self._batch_statements(batch, window)
        return statements, None if keep_back else window.statements()

    async def _caught_up(
        self, conn: aiosqlite.Connection, generations: dict[str, int], batch: tuple[int, int]
    ) -> _Window:
        """A fresh window over every pending range and ``batch``'s ids, from the rows as
        they are now (visible hits only: a block or erasure may have come meanwhile)."""
        window = self._new_window(generations)
        ranges: list[tuple[int, int]] = []
        if self._sole:  # another writer's ranges are its own to end
            async with conn.execute("SELECT first_id, last_id FROM aggregate_pending") as cur:
                ranges = [(int(a), int(b)) for a, b in await cur.fetchall()]
        if batch[1] >= batch[0]:
            ranges.append(batch)
        for first, last in _union(ranges):
            after = first - 1
            while True:
                async with conn.execute(_PENDING_HITS, (after, last)) as cur:
                    rows = list(await cur.fetchall())
                if not rows:
                    break
                after = int(rows[-1][0])
                await asyncio.to_thread(window.add, [_hit_row(r) for r in rows])
        return window

    def _end_when_idle(self) -> None:
        """End a kept-back window that nothing follows (a worker stopped, traffic ended)
        within ``_IDLE_S``, and one that is still open at its maximum age then: the age
        bounds how far the aggregates lag, whenever the next batch comes."""
        if self._idle is not None:
            self._idle.cancel()
        delay = _IDLE_S
        if self._window is not None:
            left = self._window.started + self.window_age_s - time.monotonic()
            delay = max(0.0, min(delay, left))
        self._idle = asyncio.get_running_loop().call_later(delay, self._idle_end)

    def _idle_end(self) -> None:
        self._idle = None
        task = asyncio.get_running_loop().create_task(self._end_window())
        self._idle_tasks.add(task)
        task.add_done_callback(self._idle_tasks.discard)

    async def _end_window(self) -> None:
        async with self._batch_lock:  # the state is read after any batch under way
            if self._write is None or (self._window is None and not self._catch_up):
                return
            try:
                await self._write_batch(Batch())
            except StorageError as exc:
                logger.warning("ending an aggregation window failed, retrying: %s", exc.detail)
                self._end_when_idle()

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

    async def settle_deletes(self) -> bool:
        """Checkpoint the WAL into the file and truncate it; True when that completed.

        ``secure_delete`` zeroes a deleted row in the page SQLite writes, but in WAL mode
        that page reaches the main file only at a checkpoint (every ~40 MB of writes),
        and until then the old page image stays in the file and in older WAL frames
        (driver.py). A PASSIVE checkpoint first copies what it can without blocking
        anyone. The TRUNCATE that follows holds the write lock while it waits for
        readers, so it waits ``_SETTLE_WAIT_MS`` at a time, not the 5-s busy timeout,
        and lets writers (the writer process's batches) in between its attempts. If a
        long reader (a backup, a large report) outlasts them, we log it: the next
        automatic checkpoint copies the zeroed pages into the file, and the WAL's old
        frames go as it is reused."""
        conn = self._admin
        if conn is None:
            return False
        done = False
        try:
            async with self._admin_lock:
                await conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                await conn.execute(f"PRAGMA busy_timeout = {_SETTLE_WAIT_MS}")
                try:
                    for _ in range(_SETTLE_ATTEMPTS):
                        async with conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                            row = await cur.fetchone()
                        if row is not None and not row[0]:
                            done = True
                            break
                        await asyncio.sleep(_SETTLE_WAIT_MS / 1000)
                finally:
                    await conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        except (sqlite3.Error, ValueError) as exc:
            logger.warning("checkpoint after deleting rows failed: %s", exc)
            return False
        if not done:
            logger.warning(
                "checkpoint after deleting rows could not complete (busy): the next "
                "automatic checkpoint copies the zeroed pages into the file"
            )
        return done

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SQLiteTx]:
        """A write transaction on the admin connection (BEGIN IMMEDIATE ... COMMIT)."""
        if self._admin is None:
            raise StorageError("storage is not open")
        async with self._admin_lock, _immediate(self._admin) as tx:
            yield tx


@contextlib.asynccontextmanager
async def _immediate(conn: aiosqlite.Connection) -> AsyncIterator[SQLiteTx]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on ``conn``; rolled back if the body raises."""
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
            # Named by the cursor: also on the writer's connection, which reads plain
            # tuples (its batch statements go through ``SQLiteTx`` too).
            names = [column[0] for column in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
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
