"""Where a subject's hits are: the UTC hours in which each visitor id and each IP has hits.

``hits`` has no index on ``visitor_id`` or on ``ip``. Both are random keys, so such an
index takes each hit's insert to a random page of a B-tree that outgrows the page cache,
and every batch's commit writes most of its pages again. With 400,000 hits stored the
visitor index cost the writer ~10 µs of CPU per hit (session 6) and the IP index ~7 µs
(session 7): the two largest costs on the write path (issue 8, docs/PERFORMANCE.md). A
subject is looked up for subject access, erasure, blocking and an engineer's IP
lookup, rarely and by a person; a hit is written on every page view.

So ``visitor_hours`` and ``ip_hours`` keep one row per (visitor id or IP, hour) instead.
They are what make erasure complete: a hit whose hours these tables do not point to is
invisible to subject access, erasure and blocking. Who notes them:

- **SQLite**: the batch writer, in the transaction that inserts the hits
  (``SQLiteStorage.write_batch``, through ``HoursNotes``), the only code that inserts
  into ``hits`` (a test forbids any other). Migrations 0013 and 0014 had triggers do it;
  0016 dropped them. A trigger ran two B-tree probes for every hit, ~2.4-2.8 µs of CPU
  a hit (session 11), although a visitor and its address return within the hour, so
  they almost always found their row there. ``HoursNotes`` remembers the rows this
  process noted, and a batch writes only the ones it has not. A mark of the highest hit
  id whose hours are noted (``NOTED_UP_TO``) catches hits stored some other way (an
  older version's writer still running after an upgrade, an operator's INSERT): the
  next batch, or the next process to open the file, notes their hours; deleting the
  newest hits lowers it (their ids are handed out again). From this version on, a
  collector refuses a file whose schema is newer than its own.
- **PostgreSQL**: triggers (migrations 0013 and 0014), on every insert whatever the path;
  the nodes share the database and keep no such memory.

The tables may point to more than is there (hours whose hits were depersonalised or
erased): that costs a scan of an hour, never a missed hit. Retention deletes the rows
of hours that lie wholly before its cutoff once their hits are gone; the truncated
addresses that depersonalised hits keep are not looked up by anyone and are not noted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal

from collector import rewrites
from collector.storage.base import HitRow, Statement, Storage, Transaction

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


async def purge(storage: Storage, cutoff_ms: int) -> int:
    """Forget the hours that lie wholly before ``cutoff_ms`` (retention, 5.1); the hits
    in them must be deleted or depersonalised first. Returns the rows deleted.

    It bumps the rewrite generation in the same transaction: a writer's ``HoursNotes``
    may remember rows deleted here (a late hit in an old hour) and must forget them."""
    hour = cutoff_ms // HOUR_MS
    deleted = 0
    async with storage.transaction() as tx:
        await rewrites.bump(tx)
        for table, _ in _TABLES.values():
            deleted += await tx.execute(f"DELETE FROM {table} WHERE hour < ?", [hour])
    return deleted


_NOTE_VISITOR = "INSERT OR IGNORE INTO visitor_hours (visitor_id, hour) VALUES (?, ?)"
_NOTE_IP = "INSERT OR IGNORE INTO ip_hours (ip, hour) VALUES (?, ?)"

# SQLite's safety net: the highest hit id whose hours are noted. The writer moves it in
# each batch's transaction; hits above it that the writer did not store (an older
# version's writer still running after an upgrade, a downgrade, an operator's INSERT)
# get their hours noted by the next batch or the next open (``SQLiteStorage``).
NOTED_UP_TO = "SELECT value FROM rollup_state WHERE name = 'hours_noted'"
SET_NOTED_UP_TO = (
    "INSERT INTO rollup_state (name, value) VALUES ('hours_noted', ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
# Hit ids are reused once the newest hits are deleted (no AUTOINCREMENT), so every
# transaction of ours that deletes hits lowers the mark to what is left
# (``hits_deleted``); otherwise a hit stored elsewhere under a reused id would pass
# below it unnoticed.
_LOWER_NOTED_UP_TO = (
    "UPDATE rollup_state SET value = (SELECT coalesce(max(id), 0) FROM hits) "
    "WHERE name = 'hours_noted' AND value > (SELECT coalesce(max(id), 0) FROM hits)"
)
# Parameters: (after id, up to id).
NOTE_RANGE = (
    "INSERT OR IGNORE INTO visitor_hours (visitor_id, hour) SELECT visitor_id, ts_ms / 3600000 "
    "FROM hits WHERE id > ? AND id <= ? AND visitor_id <> ''",
    "INSERT OR IGNORE INTO ip_hours (ip, hour) SELECT ip, ts_ms / 3600000 "
    "FROM hits WHERE id > ? AND id <= ?",
)


async def hits_deleted(tx: Transaction) -> None:
    """Call in every transaction that deletes hits, after the deletes (SQLite's mark of
    hours noted; on PostgreSQL there is no mark and nothing happens)."""
    await tx.execute(_LOWER_NOTED_UP_TO)


class HoursNotes:
    """The hours rows a batch must write, leaving out those this process noted before.

    A cache of what the database holds is only true while nobody deleted from it. Every
    code path that deletes hours rows (erasure, retention) bumps the rewrite generation
    (``collector.rewrites``) in its transaction; ``statements`` is given the generation
    the batch's transaction read, and forgets everything when it moved. What a batch
    noted is remembered only when the caller reports its transaction committed (the
    callable returned with the statements), so a batch that rolled back leaves nothing
    believed.
    """

    # Pairs remembered per table and generation of the cache: two generations of at most
    # this many, ~250 bytes a pair (tuple, hour, value), ~4 MB at most for both tables
    # (RSS budget). A generation that a batch would take past it becomes the old one;
    # pairs seen again move to the new one, so a returning visitor is not written again
    # and a one-off is forgotten. Remembering less is always safe.
    LIMIT = 4096

    def __init__(self) -> None:
        self._generation: int | None = None
        self._known = _Known()

    def statements(
        self, hits: Sequence[HitRow], generation: int
    ) -> tuple[list[Statement], Callable[[], None]]:
        """Insert-or-ignore statements for the (visitor id, hour) and (IP, hour) pairs of
        ``hits`` not known under ``generation``, and what to call once they committed."""
        if generation != self._generation:
            self._generation, self._known = generation, _Known()
        known = self._known
        visitors = {(h.visitor_id, h.ts_ms // HOUR_MS) for h in hits if h.visitor_id}
        ips = {(h.ip, h.ts_ms // HOUR_MS) for h in hits}
        out: list[Statement] = []
        # Sorted: a B-tree takes its inserts in key order page by page.
        if new := visitors - known.visitors - known.old_visitors:
            out.append((_NOTE_VISITOR, sorted(new)))
        if new := ips - known.ips - known.old_ips:
            out.append((_NOTE_IP, sorted(new)))

        def committed() -> None:
            if known is self._known:  # else forgotten meanwhile: nothing to believe
                known.add(visitors, ips, self.LIMIT)

        return out, committed

    def forget(self) -> None:
        """Believe nothing (the storage opened a file it may not describe)."""
        self._generation, self._known = None, _Known()


class _Known:
    """The pairs ``HoursNotes`` believes stored, in two generations per table."""

    __slots__ = ("ips", "old_ips", "old_visitors", "visitors")

    def __init__(self) -> None:
        self.visitors: set[tuple[str, int]] = set()
        self.ips: set[tuple[str, int]] = set()
        self.old_visitors: set[tuple[str, int]] = set()
        self.old_ips: set[tuple[str, int]] = set()

    def add(self, visitors: set[tuple[str, int]], ips: set[tuple[str, int]], limit: int) -> None:
        self.visitors, self.old_visitors = _remember(
            self.visitors, self.old_visitors, visitors, limit
        )
        self.ips, self.old_ips = _remember(self.ips, self.old_ips, ips, limit)


def _remember(
    current: set[tuple[str, int]], old: set[tuple[str, int]], seen: set[tuple[str, int]], limit: int
) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """(current, old) generations once ``seen`` is remembered, each at most ``limit``."""
    if len(seen) > limit:  # a batch of new visitors alone: keep some of it
        seen = set(itertools.islice(seen, limit))
    if len(current) + len(seen - current) > limit:
        return set(seen), current
    current |= seen
    return current, old
