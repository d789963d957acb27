"""Storage backends behind one protocol (``base.Storage``); ``open_storage`` picks one."""

from __future__ import annotations

from collections.abc import Sequence

from collector.config import Settings
from collector.storage.base import Aggregator, Storage


def open_storage(
    settings: Settings,
    aggregators: Sequence[Aggregator] = (),
    *,
    sole_writer: bool = False,
) -> Storage:
    """The configured backend, not yet opened (call ``await storage.open()``).

    ``aggregators`` run inside every batch transaction (see ``base.Aggregator``).
    ``sole_writer``: no other process writes hits to this SQLite file (the writer
    process), so aggregates may be summed over several batches.
    PostgreSQL comes wrapped in the local spool that keeps hits through an outage.
    """
    if settings.storage.backend == "postgres":
        from collector.storage.postgres import PostgresStorage
        from collector.storage.spool import SpoolingStorage

        s = settings.storage
        return SpoolingStorage(
            PostgresStorage(settings, aggregators), s.spool_dir, s.spool_retry_ms
        )
    from collector.storage.sqlite import SQLiteStorage

    return SQLiteStorage(settings, aggregators, sole_writer=sole_writer)


async def drop_partitions_before(storage: Storage, ts_ms: int) -> int:
    """Retention hook (5.1): drop whole daily partitions of hits older than ``ts_ms``.

    On PostgreSQL this drops every day that ends at or before ``ts_ms`` and returns how
    many; SQLite has no partitions and returns 0. Either way, delete the remaining rows
    with ``DELETE FROM hits WHERE ts_ms < ?`` afterwards (cheap once the days are gone).
    """
    drop = getattr(storage, "drop_partitions_before", None)
    return int(await drop(ts_ms)) if drop is not None else 0
