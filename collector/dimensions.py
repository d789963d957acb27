"""The analyst dimensions and where the rollups keep each one.

A module of names only, so that the CLI can offer ``--by`` choices without importing
``collector.rollups`` (which pulls in the user-agent parser: ~150 ms at every start).
"""

from __future__ import annotations

__all__ = ["CROSS_DIMENSIONS", "CROSS_FILTERS", "DIMENSIONS", "FILTERS", "HOURLY", "SKETCHED"]

DIMENSIONS: tuple[str, ...] = (
    "page",
    "referrer",
    "placement",
    "browser",
    "os",
    "device_class",
    "country",
    "source",
)
FILTERS: tuple[str, ...] = ("page", "placement", "country", "device_class", "source")
# What is kept where. Measured on the 5M-hit benchmark (docs/PERFORMANCE.md), the full
# cross product with page (thousands of paths) made the rollups larger than the hits
# and writes 50x slower, so page and referrer take part only one-dimensionally.
HOURLY: frozenset[str] = frozenset({"total", "placement", "country", "device_class", "source"})
CROSS_FILTERS: tuple[str, ...] = ("placement", "country", "device_class", "source")
CROSS_DIMENSIONS: tuple[str, ...] = tuple(d for d in DIMENSIONS if d != "page")
SKETCHED: frozenset[str] = frozenset(
    {"total", "placement", "browser", "os", "device_class", "country", "source"}
)
