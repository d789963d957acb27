"""Retries count once: (app instance id, event id) keys remembered for ``dedupe_hours``.

Consented events claim their keys in the ``collect_dedupe`` table before they are queued
for the batch writer: one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <expired>
RETURNING`` statement answers, atomically and across workers and restarts, which keys are
new (inserted, or re-claimed after the window). The hit itself is written later by the
writer, so delivery is at-most-once: a hard crash (SIGKILL, power) in the writer's flush
interval loses events whose keys were claimed -- the same window in which the pixel loses
buffered hits. SIGTERM drains the writer first, and an event the writer refuses (queue
full) gives its key back so that the client's retry counts.

Unconsented events leave no identifier on disk (3.3, 5.1), so they are deduplicated in
memory only, under keyed hashes with a per-process key: a retry after a restart can move
the anonymous counters twice, never the hits.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Sequence

from collector.storage.base import Storage

_PURGE_EVERY_S = 600.0
_MEMORY_KEYS = 200_000
_CHUNK = 500


class Deduper:
    def __init__(self, storage: Storage, window_ms: int) -> None:
        self.storage = storage
        self.window_ms = window_ms
        self._purged = 0.0
        self._key = os.urandom(32)
        self._anon: OrderedDict[bytes, int] = OrderedDict()

    async def claim(self, instance_id: str, event_ids: Sequence[str], now_ms: int) -> set[str]:
        """The ids among ``event_ids`` (distinct) not seen within the window; now marked seen."""
        claimed: set[str] = set()
        if not event_ids:
            return claimed
        async with self.storage.transaction() as tx:
            # Chunks keep the statement under SQLite's bound-parameter limit.
            for start in range(0, len(event_ids), _CHUNK):
                chunk = event_ids[start : start + _CHUNK]
                values = ", ".join("(?, ?, ?)" for _ in chunk)
                params: list[object] = []
                for event_id in chunk:
                    params += (instance_id, event_id, now_ms)
                params.append(now_ms - self.window_ms)
                sql = (
                    f"INSERT INTO collect_dedupe (instance_id, event_id, seen_ms) VALUES {values} "
                    "ON CONFLICT (instance_id, event_id) DO UPDATE SET seen_ms = excluded.seen_ms "
                    "WHERE collect_dedupe.seen_ms < ? RETURNING event_id"
                )
                claimed.update(row["event_id"] for row in await tx.fetch_all(sql, params))
            if time.monotonic() - self._purged > _PURGE_EVERY_S:
                self._purged = time.monotonic()
                await tx.execute(
                    "DELETE FROM collect_dedupe WHERE seen_ms < ?", (now_ms - self.window_ms,)
                )
        return claimed

    async def release(self, instance_id: str, event_ids: Sequence[str]) -> None:
        """Forget keys whose events were not queued, so a retry is not taken as a duplicate."""
        async with self.storage.transaction() as tx:
            for event_id in event_ids:
                await tx.execute(
                    "DELETE FROM collect_dedupe WHERE instance_id = ? AND event_id = ?",
                    (instance_id, event_id),
                )

    def claim_anonymous(self, instance_id: str, event_id: str, now_ms: int) -> bool:
        """In-memory variant for unconsented events: True when new within the window."""
        key = hmac.new(self._key, f"{instance_id}\0{event_id}".encode(), hashlib.sha256).digest()
        seen = self._anon.get(key)
        if seen is not None and seen >= now_ms - self.window_ms:
            return False
        self._anon[key] = now_ms
        self._anon.move_to_end(key)
        while len(self._anon) > _MEMORY_KEYS:
            self._anon.popitem(last=False)
        return True
