"""What a running server does for personal-data governance, started in the lifespan.

- holds a shared lock on the SQLite file, so ``collector restore`` refuses while it runs;
- keeps the in-memory block list fresh (6.2.4) and plugs it into the batch writer, and
  releases (audited) the blocks whose end has passed;
- applies retention every ``retention.interval_minutes`` (5.1) to hits and, with their own
  period, to proofs of consent; audited when it acts.

The operations themselves live in blocking.py, subjects.py, retention.py, incident.py
and backup.py; the admin API and the CLI call them and record the audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from pathlib import Path

from collector import blocking, retention
from collector.aggregates import rebuilders
from collector.audit import AuditLog
from collector.backup import DatabaseLock
from collector.blocking import BlockList, Target
from collector.config import Settings
from collector.errors import CollectorError
from collector.storage.base import Storage
from collector.subjects import Subject
from collector.writer import BatchWriter

logger = logging.getLogger(__name__)


class Governance:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        audit: AuditLog,
        writer: BatchWriter,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.audit = audit
        self.rebuilders = rebuilders(settings)
        # The writer counts what its filters drop as hits_dropped{reason="blocked"}.
        self.blocklist = BlockList(storage)
        writer.filters.append(self.blocklist.keep)
        self.blocklist.on_expired = self._expire_soon
        self._expiring: asyncio.Task[None] | None = None
        self.settle_s = 4 * self.blocklist.refresh_s
        self.lock = (
            DatabaseLock(Path(settings.storage.path))
            if settings.storage.backend == "sqlite"
            else None
        )
        self._retention: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.lock is not None:
            await self.lock.acquire_shared()
        await self.blocklist.start()
        minutes = self.settings.retention.interval_minutes
        if minutes > 0 and self._retention is None:
            self._retention = asyncio.create_task(
                self._retain_every(minutes * 60), name="collector-retention"
            )

    def settle_later(
        self, target: Target | Subject, since_ms: int, block_id: int | None = None
    ) -> None:
        """After a block, rebuild rollups again once every process has seen it."""
        task = asyncio.create_task(
            blocking.settle(
                self.storage, target, since_ms, self.settle_s, self.rebuilders, block_id
            )
        )
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def settled(self) -> None:
        """Wait until every after-block rebuild scheduled so far has run."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def _expire_soon(self) -> None:
        # One sweep at a time per process; the refresh loop asks again while any is due.
        if self._expiring is None or self._expiring.done():
            self._expiring = asyncio.create_task(self._expire(), name="collector-block-expiry")

    async def _expire(self) -> None:
        try:
            if await blocking.expire_due(self.storage, self.rebuilders, self.audit):
                await self.blocklist.refresh()
        except CollectorError as exc:
            logger.error("cannot release expired blocks, will retry: %s", exc.detail)

    async def stop(self) -> None:
        tasks = [t for t in (self._retention, self._expiring, *self._settling) if t is not None]
        self._retention = self._expiring = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.blocklist.stop()
        if self.lock is not None:
            self.lock.release()

    async def apply_retention(self) -> int:
        """One retention run; audited when it changed something or failed."""
        plan = await retention.plan(self.storage, self.settings)
        if not plan.pending:
            return 0
        try:
            done = await retention.purge(self.storage, plan, self.settings.retention.chunk_size)
        except CollectorError as exc:
            await self.audit.record(
                actor="system",
                action="retention.run",
                outcome="error",
                detail={**plan.as_dict(), "error": exc.detail},
            )
            raise
        await self.audit.record(
            actor="system", action="retention.run", detail={**plan.as_dict(), "rows": done}
        )
        logger.info("retention: %s %d hits older than %d days", plan.mode, done, plan.days)
        return done

    async def apply_consent_retention(self, actor: str = "system") -> int:
        """Delete the proofs of consent past ``consent.records_retention_days``; audited
        whenever it deletes something or fails."""
        plan = await retention.consent_records_plan(self.storage, self.settings)
        if not plan.pending:
            return 0
        chunk = self.settings.retention.chunk_size
        try:
            done = await retention.purge_consent_records(self.storage, plan, chunk, actor)
        except CollectorError as exc:
            await self.audit.record(
                actor=actor,
                action="consent_records.purge",
                outcome="error",
                detail={**plan.as_dict(), "error": exc.detail},
            )
            raise
        await self.audit.record(
            actor=actor, action="consent_records.purge", detail={**plan.as_dict(), "rows": done}
        )
        logger.info("retention: deleted %d consent records older than %d days", done, plan.days)
        return done

    async def _retain_every(self, interval_s: float) -> None:
        # Start soon after boot, jittered so several workers do not all start at once.
        await asyncio.sleep(min(interval_s, 30.0) * random.uniform(0.5, 1.0))
        while True:
            try:
                await self.apply_retention()
            except CollectorError as exc:
                logger.error("retention run failed, will retry: %s", exc.detail)
            try:
                await self.apply_consent_retention()
            except CollectorError as exc:
                logger.error("consent record retention failed, will retry: %s", exc.detail)
            await asyncio.sleep(interval_s)
