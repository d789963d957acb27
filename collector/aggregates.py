"""Which incremental aggregates the batch writer keeps.

Rollups for analysts (4) and per-IP statistics (3.3.2) are kept on write, in the
transaction of the hits or (SQLite's writer process, ``SQLiteStorage.write_batch``) of a
batch up to ``storage.aggregate_max_age_ms`` (2 s) later, with the hits' id ranges on
record meanwhile, so they never disagree for long with the rows they summarise and a
crash loses none of them.
``rebuilders`` recompute them from the visible raw hits for a time range, after
governance changed which hits count (blocking, release, erasure: 6.2.4).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from collector import ipstats, rollups
from collector.config import Settings
from collector.storage.base import Aggregator, Transaction

Rebuilder = Callable[[Transaction, int, int], Awaitable[None]]


def aggregators(settings: Settings) -> list[Aggregator]:
    found: list[Aggregator] = []
    found.append(ipstats.IpStatsAggregator(settings))
    found.append(rollups.Rollups())
    return found


def rebuilders(settings: Settings) -> list[Rebuilder]:
    """Each takes (transaction, from_ms, to_ms) and recomputes the days overlapping it."""
    found: list[Rebuilder] = []
    found.append(ipstats.rebuild)
    found.append(rollups.rebuild)
    return found
