"""Blocking (6.2.4): from the moment of the request, for the period of the check.

Two halves. ``add``/``release`` write the ``blocks`` table and rebuild the rollups for
the span of the subject's hits, so existing data drops out of (or returns to) every
aggregate at once; views hide it through ``collector.visibility.VISIBLE``. ``BlockList``
keeps the active blocks of the whole database in memory, refreshed every
``refresh_s`` by each server process, and is a ``BatchWriter`` filter: a hit of a
blocked subject is dropped at write time, including hits already queued, so a block
made anywhere (CLI, another worker) stops recording within ``refresh_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from collector.aggregates import Rebuilder
from collector.errors import Conflict, InputError, NotFound, StorageError
from collector.storage.base import HitRow, Storage
from collector.subjects import Subject, rebuild, span

logger = logging.getLogger(__name__)

_ACTIVE = "SELECT kind, value FROM blocks WHERE released_at IS NULL"


class BlockList:
    """The active blocks, in memory; a writer filter that drops blocked subjects' hits."""

    def __init__(
        self,
        storage: Storage,
        refresh_s: float = 0.25,
        on_drop: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.storage = storage
        self.refresh_s = refresh_s
        self.on_drop = on_drop
        self.visitors: frozenset[str] = frozenset()
        self.ips: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        rows = await self.storage.fetch_all(_ACTIVE)
        self.visitors = frozenset(r["value"] for r in rows if r["kind"] == "visitor")
        self.ips = frozenset(r["value"] for r in rows if r["kind"] == "ip")

    def keep(self, rows: Sequence[HitRow]) -> Sequence[HitRow]:
        visitors, ips = self.visitors, self.ips
        if not visitors and not ips:
            return rows
        kept = [r for r in rows if r.visitor_id not in visitors and r.ip not in ips]
        if len(kept) != len(rows):
            self.on_drop(len(rows) - len(kept))
        return kept

    async def start(self) -> None:
        if self._task is None:
            await self.refresh()
            self._task = asyncio.create_task(self._run(), name="collector-blocklist")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except StorageError as exc:
                # Keep enforcing the last known blocks; say so once per outage.
                if not failing:
                    logger.error("cannot refresh blocks, keeping the last known set: %s", exc)
                failing = True
            else:
                failing = False


async def add(
    storage: Storage,
    subject: Subject,
    reason: str,
    actor: str,
    rebuilders: Sequence[Rebuilder],
) -> dict[str, Any]:
    """Block ``subject``: record it and take its hits out of the rollups (one transaction)."""
    reason = reason.strip()
    if not reason:
        raise InputError("reason: say why the data is blocked (the request or the check)")
    now = int(time.time() * 1000)
    async with storage.transaction() as tx:
        if await tx.fetch_one(
            "SELECT id FROM blocks WHERE kind = ? AND value = ? AND released_at IS NULL",
            [subject.kind, subject.value],
        ):
            raise Conflict(f"{subject.kind} {subject.value} is blocked already")
        await tx.execute(
            "INSERT INTO blocks (kind, value, reason, created_at, created_by) "
            "VALUES (?, ?, ?, ?, ?)",
            [subject.kind, subject.value, reason[:500], now, actor],
        )
        row = await tx.fetch_one(
            "SELECT * FROM blocks WHERE kind = ? AND value = ? AND released_at IS NULL",
            [subject.kind, subject.value],
        )
        when = await span(tx, subject)
        if when is not None:
            await rebuild(tx, rebuilders, when)
    assert row is not None
    return {**row, "span_ms": list(when) if when else None}


async def release(
    storage: Storage, block_id: int, actor: str, rebuilders: Sequence[Rebuilder]
) -> dict[str, Any]:
    """Unblock: the subject's hits count again, and new hits are recorded again."""
    now = int(time.time() * 1000)
    async with storage.transaction() as tx:
        row = await tx.fetch_one("SELECT * FROM blocks WHERE id = ?", [block_id])
        if row is None or row["released_at"] is not None:
            raise NotFound(f"no active block with id {block_id}")
        await tx.execute(
            "UPDATE blocks SET released_at = ?, released_by = ? WHERE id = ?",
            [now, actor, block_id],
        )
        subject = Subject(row["kind"], row["value"])
        when = await span(tx, subject)
        if when is not None:
            await rebuild(tx, rebuilders, when)
    return {**row, "released_at": now, "released_by": actor}


async def find_active(storage: Storage, subject: Subject) -> int:
    """The id of the active block on ``subject`` (for ``collector unblock --visitor``)."""
    row = await storage.fetch_one(
        "SELECT id FROM blocks WHERE kind = ? AND value = ? AND released_at IS NULL",
        [subject.kind, subject.value],
    )
    if row is None:
        raise NotFound(f"{subject.kind} {subject.value} is not blocked")
    return int(row["id"])


async def listing(storage: Storage, *, active_only: bool = True) -> list[dict[str, Any]]:
    where = "WHERE released_at IS NULL" if active_only else ""
    return await storage.fetch_all(f"SELECT * FROM blocks {where} ORDER BY id DESC")


async def settle(
    storage: Storage,
    subject: Subject,
    since_ms: int,
    wait_s: float,
    rebuilders: Sequence[Rebuilder],
) -> None:
    """Close the race of a block made while other processes had not yet refreshed.

    For up to one refresh period after a block, a server that has not yet seen it may
    still store a hit of the subject (hidden by VISIBLE, but added to a rollup by the
    in-batch aggregators). After ``wait_s`` every process has refreshed, so rebuilding
    the span of the hits stored since the block makes the rollups exact again.
    """
    if not rebuilders:
        return
    await asyncio.sleep(wait_s)
    async with storage.transaction() as tx:
        row = await tx.fetch_one(
            f"SELECT min(ts_ms) AS lo, max(ts_ms) AS hi FROM hits "
            f"WHERE {subject.column} = ? AND ts_ms >= ?",
            [subject.value, since_ms - 60_000],
        )
        if row and row["lo"] is not None:
            await rebuild(tx, rebuilders, (int(row["lo"]), int(row["hi"]) + 1))
