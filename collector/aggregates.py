"""Which incremental aggregates run inside each batch transaction.

Rollups for analysts (4) and per-IP statistics (3.3.2) are kept on write, in the same
transaction as the hits, so they can never disagree with the rows they summarise.
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
