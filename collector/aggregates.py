"""Which incremental aggregates run inside each batch transaction, and how to rebuild them.

Rollups for analysts (4) and per-IP statistics (3.3.2) are kept on write, in the same
transaction as the hits, so they can never disagree with the rows they summarise.
When hits change after the fact — a subject is blocked or unblocked (6.2.4) or erased —
every ``Rebuilder`` recomputes its buckets for the affected time span from the visible
hits (``collector.visibility.VISIBLE``), inside the governance transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from collector.config import Settings
from collector.storage.base import Aggregator, Transaction

# (tx, from_ms, to_ms): rebuild every bucket overlapping [from_ms, to_ms) from visible hits.
Rebuilder = Callable[[Transaction, int, int], Awaitable[None]]


def aggregators(settings: Settings) -> list[Aggregator]:
    found: list[Aggregator] = []
    return found


def rebuilders(settings: Settings) -> list[Rebuilder]:
    """One per aggregate kept in ``aggregators``; governance calls all of them."""
    found: list[Rebuilder] = []
    return found
