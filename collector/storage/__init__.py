"""Storage backends behind one protocol (``base.Storage``); ``open_storage`` picks one."""

from __future__ import annotations

from collections.abc import Sequence

from collector.config import Settings
from collector.errors import ConfigError
from collector.storage.base import Aggregator, Storage


def open_storage(settings: Settings, aggregators: Sequence[Aggregator] = ()) -> Storage:
    """The configured backend, not yet opened (call ``await storage.open()``).

    ``aggregators`` run inside every batch transaction (see ``base.Aggregator``).
    """
    if settings.storage.backend == "postgres":
        raise ConfigError("storage.backend: the postgres backend is not available yet")
    from collector.storage.sqlite import SQLiteStorage

    return SQLiteStorage(settings, aggregators)
