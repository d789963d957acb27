"""Where a visitor's hits are: the UTC hours in which each visitor id has hits.

``hits`` has no index on ``visitor_id``. Visitor ids are random, so such an index takes
each hit's insert to a random page of a B-tree that outgrows the page cache, and every
batch's commit writes most of its pages again: with 400,000 hits stored it cost the
writer ~10 µs of CPU per hit, the largest single cost left on the write path (issue 8,
docs/PERFORMANCE.md, session 6). A visitor is looked up for subject access, erasure and
blocking, rarely and by an administrator; a hit is written on every page view.

So ``visitor_hours`` keeps one row per (visitor id, hour) instead, filled by a trigger
on every insert into ``hits`` (migration 0013), whatever the path: the pixel's batches,
app collection, a replayed spool. The trigger is what makes erasure complete: no code
path can store a hit that this table does not point to. A visitor's hits are then the
rows of ``hits`` inside those hours (the ``hits_ts`` index) that carry the visitor id.

The table may point to more than is there (hours whose hits were depersonalised or
erased): that costs a scan of an hour, never a missed hit. Retention deletes the rows
of hours that lie wholly before its cutoff once their hits are gone.
"""

from __future__ import annotations

from typing import Any

from collector.storage.base import Storage, Transaction

HOUR_MS = 3_600_000


async def ranges(db: Storage | Transaction, visitor_id: str) -> list[tuple[int, int]]:
    """The [lo, hi) ts_ms ranges that hold every hit of ``visitor_id``, in time order:
    runs of consecutive hours merged into one range."""
    rows = await db.fetch_all(
        "SELECT hour FROM visitor_hours WHERE visitor_id = ? ORDER BY hour", [visitor_id]
    )
    out: list[tuple[int, int]] = []
    for row in rows:
        lo = int(row["hour"]) * HOUR_MS
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], lo + HOUR_MS)
        else:
            out.append((lo, lo + HOUR_MS))
    return out


async def where(db: Storage | Transaction, visitor_id: str) -> list[tuple[str, list[Any]]]:
    """WHERE clauses over ``hits`` that together select exactly the visitor's hits, one
    per range, in time order (none: the visitor has no hits)."""
    return [
        ("ts_ms >= ? AND ts_ms < ? AND visitor_id = ?", [lo, hi, visitor_id])
        for lo, hi in await ranges(db, visitor_id)
    ]


async def purge(db: Storage | Transaction, cutoff_ms: int) -> int:
    """Forget the hours that lie wholly before ``cutoff_ms`` (retention, 5.1); the hits
    in them must be deleted or depersonalised first. Returns the rows deleted."""
    return await db.execute("DELETE FROM visitor_hours WHERE hour < ?", [cutoff_ms // HOUR_MS])
