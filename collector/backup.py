"""Backup and restore of the SQLite store (5.5: data destroyed or damaged is restored).

``backup`` uses SQLite's online backup API in one step: that is one read transaction,
a consistent snapshot, and in WAL mode the running server's writer is never blocked by
it. (A stepwise backup restarts whenever another connection writes, which under load
means never finishing.) The copy is written to ``FILE.partial`` with mode 0600, checked
with ``PRAGMA integrity_check`` and renamed into place.

``restore`` first proves the file is a sound collector database, then refuses while a
server holds the database (each server process holds a shared ``flock`` on
``<db>.lock`` for its lifetime), sets the current file aside as
``<db>.replaced-<UTC time>`` and copies the backup in. PostgreSQL: use pg_dump or PITR.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.errors import InputError, StorageError
from collector.storage.driver import connect, sqlite3
from collector.storage.migrations import migrations
from collector.storage.sqlite import create_private_file

_REQUIRED = {"schema_version", "hits", "audit_log", "pixel_counts"}


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


class DatabaseLock:
    """A server's shared claim on the database file; ``restore`` needs it exclusive."""

    def __init__(self, db: Path) -> None:
        self.path = lock_path(db)
        self._fd: int | None = None

    async def acquire_shared(self, timeout_s: float = 30.0) -> None:
        """Wait while a restore runs (it holds the lock exclusively), then hold it shared."""
        if self._fd is not None:
            return
        create_private_file(self.path)
        fd = os.open(self.path, os.O_RDONLY)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StorageError(f"{self.path} is locked: a restore is running") from None
                await asyncio.sleep(0.1)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock


@contextlib.contextmanager
def exclusive(db: Path) -> Iterator[None]:
    """Hold the database exclusively, or fail at once if a server is running on it."""
    path = lock_path(db)
    create_private_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{db} is in use by a running collector server; stop it before restoring"
            ) from None
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Copied:
    path: str
    bytes: int
    hits: int
    schema_version: int
    seconds: float
    replaced: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "hits": self.hits,
            "schema_version": self.schema_version,
            "seconds": round(self.seconds, 3),
            "replaced": self.replaced,
        }


def _copy(src: Path, dest: Path) -> None:
    """One-step online backup of ``src`` into a fresh 0600 file ``dest``."""
    try:
        _copy_unchecked(src, dest)
    except OSError as exc:
        raise InputError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:
        raise StorageError(f"copying {src} to {dest} failed: {exc}") from None


def _copy_unchecked(src: Path, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    create_private_file(dest)
    source = connect(src)
    try:
        source.execute("PRAGMA busy_timeout = 5000")
        target = connect(dest)
        try:
            source.backup(target)  # pages=-1: the whole file in one step, one snapshot
            target.execute("PRAGMA journal_mode = DELETE")  # a single self-contained file
        finally:
            target.close()
    finally:
        source.close()
    with open(dest, "rb") as fh:
        os.fsync(fh.fileno())


def inspect(path: Path) -> tuple[int, int]:
    """(schema version, hits) of a sound collector database, else InputError saying why."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        conn = connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise InputError(f"{path} cannot be opened: {exc}") from None
    try:
        check = conn.execute("PRAGMA integrity_check").fetchall()
        if [tuple(r) for r in check] != [("ok",)]:
            raise InputError(f"{path} is damaged: integrity_check says {check[0][0]}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not _REQUIRED <= tables:
            raise InputError(f"{path} is not a collector database (tables missing)")
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        hits = conn.execute("SELECT count(*) FROM hits").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path} is not a collector database: {exc}") from None
    finally:
        conn.close()
    newest = max((n for n, _, _ in migrations("sqlite")), default=0)
    if version > newest:
        raise InputError(f"{path} has schema {version}, newer than this collector ({newest})")
    return int(version), int(hits)


def backup(db: Path, dest: Path, *, force: bool = False) -> Copied:
    """Copy the live database ``db`` to ``dest`` (refuses to overwrite unless ``force``)."""
    if dest.exists() and not force:
        raise InputError(f"{dest} exists already (use --force to overwrite)")
    if dest.resolve() == db.resolve():
        raise InputError("the backup file must not be the database itself")
    started = time.perf_counter()
    partial = dest.with_name(dest.name + ".partial")
    try:
        _copy(db, partial)
        version, hits = inspect(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    return Copied(str(dest), dest.stat().st_size, hits, version, time.perf_counter() - started)


def restore(db: Path, src: Path) -> Copied:
    """Replace ``db`` by the backup ``src``; the old file is kept aside. Needs no server."""
    version, hits = inspect(src)
    started = time.perf_counter()
    with exclusive(db):
        replaced = None
        if db.exists():
            conn = connect(db)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # fold the WAL into the file
            finally:
                conn.close()
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = db.with_name(f"{db.name}.replaced-{stamp}")
            os.replace(db, aside)
            replaced = str(aside)
            for suffix in ("-wal", "-shm"):
                side = db.with_name(db.name + suffix)
                if side.exists():
                    os.replace(side, aside.with_name(aside.name + suffix))
        incoming = db.with_name(db.name + ".restoring")
        _copy(src, incoming)
        os.replace(incoming, db)
    return Copied(
        str(db), db.stat().st_size, hits, version, time.perf_counter() - started, replaced
    )
