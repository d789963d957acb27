"""Where a subject's hits are: the UTC hours in which each visitor id and each IP has hits.

``hits`` has no index on ``visitor_id`` or on ``ip``. Both are random keys, so such an
index takes each hit's insert to a random page of a B-tree that outgrows the page cache,
and every batch's commit writes most of its pages again. With 400,000 hits stored the
visitor index cost the writer ~10 µs of CPU per hit (session 6) and the IP index ~7 µs
(session 7): the two largest costs on the write path (issue 8, docs/PERFORMANCE.md). A
subject is looked up for subject access, erasure, blocking and an engineer's IP
lookup, rarely and by a person; a hit is written on every page view.

So ``visitor_hours`` and ``ip_hours`` keep one row per (visitor id or IP, hour) instead,
filled by triggers on every insert into ``hits`` (migrations 0013 and 0014), whatever
the path: the pixel's batches, app collection, a replayed spool. The triggers are what
make erasure complete: no code path can store a hit that these tables do not point to.
A visitor returns within the hour, and so does its address, so the triggers mostly find
their row and write nothing. A subject's hits are then the rows of ``hits`` inside those
hours (the ``hits_ts`` index) that carry its value.

The tables may point to more than is there (hours whose hits were depersonalised or
erased): that costs a scan of an hour, never a missed hit. Retention deletes the rows
of hours that lie wholly before its cutoff once their hits are gone; the truncated
addresses that depersonalised hits keep are not looked up by anyone and are not noted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from collector.storage.base import Storage, Transaction

HOUR_MS = 3_600_000

Kind = Literal["visitor", "ip"]
# kind -> (the hours table, its column and the column of hits it notes: the same name)
_TABLES: dict[str, tuple[str, str]] = {
    "visitor": ("visitor_hours", "visitor_id"),
    "ip": ("ip_hours", "ip"),
}


async def ranges(
    db: Storage | Transaction, kind: Kind, values_sql: str, params: Sequence[Any]
) -> list[tuple[int, int]]:
    """The [lo, hi) ts_ms ranges that hold every hit of the subjects ``values_sql``
    names (``?`` for one value, or a subquery), in time order: runs of consecutive hours
    merged into one range."""
    table, column = _TABLES[kind]
    rows = await db.fetch_all(
        f"SELECT DISTINCT hour FROM {table} WHERE {column} IN ({values_sql}) ORDER BY hour",
        list(params),
    )
    out: list[tuple[int, int]] = []
    for row in rows:
        lo = int(row["hour"]) * HOUR_MS
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], lo + HOUR_MS)
        else:
            out.append((lo, lo + HOUR_MS))
    return out


async def where(db: Storage | Transaction, kind: Kind, value: str) -> list[tuple[str, list[Any]]]:
    """WHERE clauses over ``hits`` that together select exactly the hits of one visitor
    id or IP, one per range, in time order (none: no hits)."""
    return await where_in(db, kind, "?", [value])


async def where_in(
    db: Storage | Transaction, kind: Kind, values_sql: str, params: Sequence[Any]
) -> list[tuple[str, list[Any]]]:
    """As ``where``, for every value ``values_sql`` names (``?``, or a subquery such as
    the addresses of a network block)."""
    column = _TABLES[kind][1]
    return [
        (f"ts_ms >= ? AND ts_ms < ? AND {column} IN ({values_sql})", [lo, hi, *params])
        for lo, hi in await ranges(db, kind, values_sql, params)
    ]


async def purge(db: Storage | Transaction, cutoff_ms: int) -> int:
    """Forget the hours that lie wholly before ``cutoff_ms`` (retention, 5.1); the hits
    in them must be deleted or depersonalised first. Returns the rows deleted."""
    hour = cutoff_ms // HOUR_MS
    deleted = 0
    for table, _ in _TABLES.values():
        deleted += await db.execute(f"DELETE FROM {table} WHERE hour < ?", [hour])
    return deleted
