"""Keep answering pixels while PostgreSQL is down: batches wait in a local SQLite spool.

``SpoolingStorage`` wraps the PostgreSQL backend. ``write_batch`` goes straight to the
database; when the database is unreachable (``DatabaseUnreachable``) the batch is
appended to a spool file instead and the call succeeds, so the writer stays healthy,
its memory stays bounded and every hit already answered with the GIF is kept. While
anything is spooled, new batches are spooled behind it, and a background task replays
the spool oldest-first every ``spool_retry_ms`` once the database answers again. So
hits reach PostgreSQL in the order they were accepted, and the aggregators run on
replay inside the same transaction as the hits, as they would have.

Each worker process owns one file ``spool-<pid>-<random>.db`` in ``storage.spool_dir``
(mode 0600, ``synchronous=FULL``: a spooled batch survives a crash) and holds an
``flock`` on it. A process that starts adopts the files whose owner is gone (a crash,
a restart during the outage) and replays them before its own.

Delivery is at least once: a replayed batch is removed from the spool after PostgreSQL
committed it, so a crash in between, or a connection lost during COMMIT, can store that
batch twice. Losing hits is the failure we rule out; a rare duplicate batch is the price.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from collector.errors import DatabaseUnreachable, StorageError
from collector.storage.base import Batch, HitRow, Transaction
from collector.storage.driver import connect, sqlite3
from collector.storage.postgres import PostgresStorage

logger = logging.getLogger(__name__)

_CLOSE_DRAIN_S = 10.0  # at shutdown, how long we try to empty the spool into the database


def _encode(batch: Batch) -> str:
    return json.dumps(
        {
            "hits": [list(h) for h in batch.hits],
            "counts": [[*key, n] for key, n in batch.pixel_counts.items()],
        },
        separators=(",", ":"),
    )


def _decode(payload: str) -> Batch:
    data = json.loads(payload)
    return Batch(
        hits=[HitRow(*h) for h in data["hits"]],
        pixel_counts={(d, p, c): n for d, p, c, n in data["counts"]},
    )


class SpoolFile:
    """One SQLite spool file, locked by this process for as long as it is open."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self._db = connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY, "
            "hits INTEGER NOT NULL, batch TEXT NOT NULL)"
        )
        self.batches, hits = self._db.execute(
            "SELECT count(*), coalesce(sum(hits), 0) FROM spool"
        ).fetchone()
        self.hits = int(hits)

    @classmethod
    def create(cls, directory: Path) -> SpoolFile:
        name = f"spool-{os.getpid()}-{secrets.token_hex(4)}.db"
        # Lock under a name adopters ignore, then rename: nobody can adopt a file that is
        # being born.
        tmp = directory / f".{name}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, directory / name)
        return cls(directory / name, fd)

    @classmethod
    def adopt(cls, path: Path) -> SpoolFile | None:
        """Open a spool file whose owner is gone; None while its owner still runs."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not path.exists():  # removed by its owner between listing and locking
            os.close(fd)
            return None
        return cls(path, fd)

    def append(self, batch: Batch) -> int:
        cur = self._db.execute(
            "INSERT INTO spool (hits, batch) VALUES (?, ?)", (len(batch.hits), _encode(batch))
        )
        self.batches += 1
        self.hits += len(batch.hits)
        return int(cur.lastrowid or 0)

    def oldest(self) -> tuple[int, Batch] | None:
        row = self._db.execute("SELECT id, batch FROM spool ORDER BY id LIMIT 1").fetchone()
        return (int(row[0]), _decode(row[1])) if row else None

    def remove(self, row_id: int, hits: int) -> None:
        self._db.execute("DELETE FROM spool WHERE id = ?", (row_id,))
        self.batches -= 1
        self.hits -= hits

    def close(self, *, delete_if_empty: bool) -> None:
        self._db.close()
        if delete_if_empty and self.batches == 0:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
        os.close(self._lock_fd)


class SpoolingStorage:
    """``Storage`` that delegates to PostgreSQL and spools batches while it is down."""

    def __init__(self, inner: PostgresStorage, directory: str, retry_ms: int) -> None:
        self.inner = inner
        self.directory = Path(directory)
        self.retry_s = retry_ms / 1000
        self._files: list[SpoolFile] = []  # adopted ones first, our own last
        # Spooled batches whose own write failed as "unreachable": the connection may
        # have dropped after PostgreSQL committed them (at COMMIT's answer, or when the
        # pool reset the connection), so replay first looks for their hits.
        self._unsure: set[tuple[SpoolFile, int]] = set()
        self._lock = asyncio.Lock()  # one spool operation (or replayed batch) at a time
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        if self._task is not None:
            return
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            adopted = [
                f for p in sorted(self.directory.glob("spool-*.db")) if (f := SpoolFile.adopt(p))
            ]
            self._files = [*adopted, SpoolFile.create(self.directory)]
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"storage.spool_dir: cannot use {self.directory}: {exc}") from exc
        for f in adopted:
            if f.batches:
                logger.warning("adopted spool %s with %d hits to replay", f.path, f.hits)
        await self.inner.open()
        self._task = asyncio.create_task(self._replay_loop(), name="collector-spool-replay")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # Try to hand everything over before leaving; what is left waits on disk for
            # the next start (of this node or any node sharing the spool_dir).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.replay(), _CLOSE_DRAIN_S)
        for f in self._files:
            f.close(delete_if_empty=True)
        self._files = []
        await self.inner.close()

    # --- the batch ------------------------------------------------------------------

    async def write_batch(self, batch: Batch) -> None:
        async with self._lock:
            if not self.spooled_batches():
                try:
                    await self.inner.write_batch(batch)
                    return
                except DatabaseUnreachable as exc:
                    logger.error("PostgreSQL unreachable, spooling hits locally: %s", exc.detail)
                    own = self._own
                    self._unsure.add((own, await asyncio.to_thread(own.append, batch)))
                    return
            await asyncio.to_thread(self._own.append, batch)

    @property
    def _own(self) -> SpoolFile:
        if not self._files:
            raise StorageError("storage is not open")
        return self._files[-1]

    def spooled_batches(self) -> int:
        return sum(f.batches for f in self._files)

    def spool_depth(self) -> int:
        """Hits waiting in the spool (``/healthz`` and ``collector_spool_hits``)."""
        return sum(f.hits for f in self._files)

    def spool_status(self) -> dict[str, Any]:
        return {"hits": self.spool_depth(), "batches": self.spooled_batches()}

    async def _replay_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            if self.spooled_batches():
                await self.replay()

    async def replay(self) -> bool:
        """Move spooled batches to PostgreSQL oldest-first; True when the spool is empty."""
        before = self.spool_depth()
        while True:
            async with self._lock:
                source = next((f for f in self._files if f.batches), None)
                if source is None:
                    if before:
                        logger.warning("PostgreSQL back: replayed %d spooled hits", before)
                    return True
                found = await asyncio.to_thread(source.oldest)
                if found is None:  # counts were off (cannot happen; be safe)
                    source.batches = source.hits = 0
                    continue
                row_id, batch = found
                try:
                    if (source, row_id) not in self._unsure or not await self.inner.holds(batch):
                        await self.inner.write_batch(batch)
                    else:
                        logger.warning("spooled batch %d was stored before the outage", row_id)
                except DatabaseUnreachable:
                    return False
                except StorageError as exc:
                    # Kept, not skipped: a batch the database refuses is retried until
                    # someone fixes the cause (writer semantics; nothing silently lost).
                    logger.error("spooled batch %d not accepted, will retry: %s", row_id, exc)
                    return False
                await asyncio.to_thread(source.remove, row_id, len(batch.hits))
                self._unsure.discard((source, row_id))
                if source is not self._own and not source.batches:
                    source.close(delete_if_empty=True)
                    self._files.remove(source)

    # --- everything else goes to PostgreSQL -------------------------------------------

    async def drop_partitions_before(self, ts_ms: int) -> int:
        return await self.inner.drop_partitions_before(ts_ms)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def settle_deletes(self) -> bool:
        return await self.inner.settle_deletes()

    async def schema_version(self) -> int:
        return await self.inner.schema_version()

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await self.inner.fetch_all(sql, params)

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        return await self.inner.fetch_one(sql, params)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return await self.inner.execute(sql, params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.inner.transaction() as tx:
            yield tx
