"""Which incremental aggregates run inside each batch transaction.

Rollups for analysts (4) and per-IP statistics (3.3.2) are kept on write, in the same
transaction as the hits, so they can never disagree with the rows they summarise.
``rebuilders`` recompute them for a time range from the visible hits, after governance
blocks, unblocks or erases a subject (6.2.4); retention never calls them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from collector import rollups
from collector.config import Settings
from collector.storage.base import Aggregator, Transaction

Rebuilder = Callable[[Transaction, int, int], Awaitable[None]]


def aggregators(settings: Settings) -> list[Aggregator]:
    found: list[Aggregator] = []
    found.append(rollups.Rollups())
    return found


def rebuilders(settings: Settings) -> list[Rebuilder]:
    """Functions ``(tx, from_ms, to_ms)`` that recompute aggregates for that range."""
    found: list[Rebuilder] = []
    found.append(rollups.rebuild)
    return found
