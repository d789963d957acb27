"""Where a subject's hits are: the UTC hours in which each visitor id and each IP has hits.

``hits`` has no index on ``visitor_id`` or on ``ip``. Both are random keys, so such an
index takes each hit's insert to a random page of a B-tree that outgrows the page cache,
and every batch's commit writes most of its pages again. With 400,000 hits stored the
visitor index cost the writer ~10 µs of CPU per hit (session 6) and the IP index ~7 µs
(session 7): the two largest costs on the write path (issue 8, docs/PERFORMANCE.md). A
subject is looked up for subject access, erasure, blocking and an engineer's IP
lookup, rarely and by a person; a hit is written on every page view.

So ``visitor_hours`` and ``ip_hours`` keep one row per (visitor id or IP, hour) instead.
``visitor_hours`` is keyed by the hour first (migration 0017): keyed by the visitor, each
new visitor's row went to a random page, and noting a batch of them rewrote most of the
table's pages once it outgrew the page cache (docs/PERFORMANCE.md, session 14). A
visitor's hours are read with a seek per stored hour (``storage.keys.walk``). ``ip_hours``
keeps the address first: an engineer's IP lookup reads it on every page, and a network
block's lookup reads every member address.
They are what make erasure complete: a hit whose hours these tables do not point to is
invisible to subject access, erasure and blocking. Who notes them:

- **SQLite**: the batch writer, with one ``INSERT OR IGNORE ... SELECT`` per table over
  ids it wrote (``SQLiteStorage.write_batch``). Migrations 0013 and 0014 had triggers do
  it; 0016 dropped them: a trigger's program ran for every hit, and the two statements
  cost ~1.4-1.6 µs of the writer's CPU a hit less (session 11). A mark of the highest
  hit id whose hours are noted (``NOTED_UP_TO``) makes the statements cover every id
  above it, so hits stored some other way (an older version's writer still running
  after an upgrade, an operator's INSERT) are noted too; deleting the newest hits lowers
  it (their ids are handed out again). From this version on, a collector refuses a file
  whose schema is newer than its own.
  A writer that shares the file notes in each batch's transaction. The writer process,
  the file's one writer under ``collector serve``, lets 32,768 hits wait (or until a
  batch comes 30 s after the first waiting one) and notes them in one pass, each page
  of the tables once: one batch at a time, a new address's pair (and, before 0017, a new
  visitor's) took a random page each (session 12). So whatever reads the tables first
  notes every hit above the mark (``catch_up``): every lookup here, a network block's
  members, and every process that opens the file.
- **PostgreSQL**: triggers (migrations 0013 and 0014; 0017 orders the visitor one by the
  new key), on every insert whatever the path and whichever node.

The tables may point to more than is there (hours whose hits were depersonalised or
erased): that costs a scan of an hour, never a missed hit. Retention deletes the rows
of hours that lie wholly before its cutoff once their hits are gone; the truncated
addresses that depersonalised hits keep are not looked up by anyone and are not noted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, cast

from collector.storage.base import Storage, Transaction
from collector.storage.keys import walk

logger = logging.getLogger(__name__)

HOUR_MS = 3_600_000

Kind = Literal["visitor", "ip"]
# kind -> (the hours table, its column and the column of hits it notes: the same name)
_TABLES: dict[str, tuple[str, str]] = {
    "visitor": ("visitor_hours", "visitor_id"),
    "ip": ("ip_hours", "ip"),
}


def rows_of(kind: Kind, values_sql: str = "?") -> str:
    """The clause selecting the hours table's rows of the subjects ``values_sql`` names:
    ``visitor_hours`` is keyed by (hour, visitor id), so its rows are read a stored hour
    at a time; ``ip_hours`` by (ip, hour)."""
    table, column = _TABLES[kind]
    if kind == "visitor":
        return f"{column} IN ({values_sql}) AND hour IN {walk(table, 'hour')}"
    return f"{column} IN ({values_sql})"


async def ranges(
    db: Storage | Transaction, kind: Kind, values_sql: str, params: Sequence[Any]
) -> list[tuple[int, int]]:
    """The [lo, hi) ts_ms ranges that hold every hit of the subjects ``values_sql``
    names (``?`` for one value, or a subquery), in time order: runs of consecutive hours
    merged into one range."""
    await catch_up(db)
    rows = await db.fetch_all(
        f"SELECT DISTINCT hour FROM {_TABLES[kind][0]} WHERE {rows_of(kind, values_sql)} "
        "ORDER BY hour",
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


# SQLite: the highest hit id whose hours are noted. Whoever notes (the writer, a lookup's
# ``catch_up``, a process opening the file) notes every id above it, whoever stored them,
# and moves it.
NOTED_UP_TO = "SELECT value FROM rollup_state WHERE name = 'hours_noted'"
SET_NOTED_UP_TO = (
    "INSERT INTO rollup_state (name, value) VALUES ('hours_noted', ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
# The first id of the writer process's hits that wait to be noted (``_NOTE_HITS`` in
# storage.sqlite), or lower: every batch that leaves its hits waiting lowers it to its
# first id if need be, and noting deletes it. Its ids may lie below the mark when
# something deleted the newest hits without lowering it (a hand-made DELETE); noting
# starts below both. Ids above the mark and below it come from another writer.
PENDING_FROM = "SELECT value FROM rollup_state WHERE name = 'hours_pending_from'"
SET_PENDING_FROM = (
    "INSERT INTO rollup_state (name, value) VALUES ('hours_pending_from', ?) "
    "ON CONFLICT (name) DO UPDATE SET value = min(value, excluded.value)"
)
_CLEAR_PENDING_FROM = "DELETE FROM rollup_state WHERE name = 'hours_pending_from'"
# Hit ids are reused once the newest hits are deleted (no AUTOINCREMENT), so every
# transaction of ours that deletes hits lowers the mark to what is left
# (``hits_deleted``); otherwise a hit stored elsewhere under a reused id would pass
# below it unnoticed.
_LOWER_NOTED_UP_TO = (
    "UPDATE rollup_state SET value = (SELECT coalesce(max(id), 0) FROM hits) "
    "WHERE name = 'hours_noted' AND value > (SELECT coalesce(max(id), 0) FROM hits)"
)
# The hours of the hits with ids in (after, up to]: parameters (after id, up to id). Each
# pair once, in key order: a writer that notes tens of thousands of hits at a time
# (``SQLiteStorage``, ``_NOTE_HITS``) then visits each page of the tables' B-trees once,
# where one hit after another would take each new address to a random page. The columns
# are selected in key order too: one sorter then serves DISTINCT and ORDER BY.
NOTE_RANGE = (
    "INSERT OR IGNORE INTO visitor_hours (hour, visitor_id) "
    "SELECT DISTINCT ts_ms / 3600000, visitor_id FROM hits "
    "WHERE id > ? AND id <= ? AND visitor_id <> '' ORDER BY 1, 2",
    "INSERT OR IGNORE INTO ip_hours (ip, hour) "
    "SELECT DISTINCT ip, ts_ms / 3600000 FROM hits WHERE id > ? AND id <= ? ORDER BY 1, 2",
)


async def hits_deleted(tx: Transaction) -> None:
    """Call in every transaction that deletes hits, after the deletes (SQLite's mark of
    hours noted; on PostgreSQL there is no mark and nothing happens)."""
    if await tx.fetch_one(NOTED_UP_TO) is not None:
        await tx.execute(_LOWER_NOTED_UP_TO)


async def note_hours(
    tx: Transaction,
    top: int,
    own: Sequence[tuple[int, int]] | None = None,
    most: int | None = None,
) -> int:
    """Note the hours of the hits above the mark up to id ``top`` (at most ``most`` of
    them) and move the mark there; returns it. SQLite only; a missing mark notes every hit.

    ``own``: the id ranges, in order, that the calling writer stored since it last noted,
    noted even if the mark is above them (a hand-made DELETE of the newest hits does not
    lower it). Without ``own`` (a lookup, an open), the ids from ``PENDING_FROM`` on count
    as the writer process's. Any other id is a hit that something else stored (an older
    version's writer still running, an operator's INSERT): a warning names them."""
    mark = await tx.fetch_one(NOTED_UP_TO)
    pending = await tx.fetch_one(PENDING_FROM)
    waiting = int(pending["value"]) if pending else None
    low = int(mark["value"]) if mark else 0
    for first in [a for a, _ in own or ()] + ([waiting] if waiting else []):
        low = min(low, first - 1)
    upto = top if most is None else min(top, low + most)
    if upto > low:
        for sql in NOTE_RANGE:
            await tx.execute(sql, [low, upto])
        if own is None:
            own = [(waiting, upto)] if waiting else []
        if foreign := _gaps(low, upto, own):
            logger.warning(
                "hits %s were stored by another writer: their hours are noted now",
                ", ".join(f"{a} to {b}" if b > a else str(a) for a, b in foreign),
            )
    await tx.execute(SET_NOTED_UP_TO, [upto])
    if pending:  # every id up to the mark is noted now, the rest lie above it
        await tx.execute(_CLEAR_PENDING_FROM)
    return upto


def _gaps(low: int, upto: int, own: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ids in (low, upto] outside the ranges ``own`` (in order)."""
    out, at = [], low + 1
    for first, last in own:
        if first > at:
            out.append((at, min(first - 1, upto)))
        at = max(at, last + 1)
    if at <= upto:
        out.append((at, upto))
    return [(a, b) for a, b in out if a <= b]


async def catch_up(db: Storage | Transaction) -> None:
    """Note the hours of hits above SQLite's mark, before anything reads the hours tables:
    the writer process notes its own in bulk, every ``_NOTE_HITS`` hits (storage.sqlite),
    and something other than the batch writer may have stored some since. Three lookups
    by key when there are none. PostgreSQL has no mark (its triggers note)."""
    mark = await db.fetch_one(NOTED_UP_TO)
    if mark is None:
        return
    top = await _top(db)
    if top <= int(mark["value"]) and await db.fetch_one(PENDING_FROM) is None:
        return
    transaction = getattr(db, "transaction", None)  # a Storage; else already in one
    if transaction is None:
        await note_hours(cast(Transaction, db), top)
    else:  # read again under the write lock
        async with transaction() as tx:
            await note_hours(tx, await _top(tx))


async def _top(db: Storage | Transaction) -> int:
    row = await db.fetch_one("SELECT coalesce(max(id), 0) AS n FROM hits")
    return int(row["n"]) if row else 0
