"""The statements that insert a batch's hits into SQLite, built for the least binding.

A large part of the writer's cost a row is binding its parameters: the sqlite3 module's
conversions, and SQLite copying each text it is given (docs/PERFORMANCE.md, sessions 9
and 13). Two things make that cheaper:

- **Pixel hits leave the app-collection columns (migration 0008) NULL.** Binding 22
  instead of 29 parameters, from plain tuples rather than ``HitRow`` named tuples (which
  the sqlite3 module reads item by item through the sequence protocol), halved the
  per-row cost of the insert without its indexes: 7.5 -> 3.9 µs (session 2).
- **Columns that are NULL in every hit of the batch are left out of the statement**,
  three or more of them, so SQLite stores their default (NULL) without a parameter.
  Python 3.11's sqlite3 binds each None through the adapter registry (``driver.py``),
  ~700 instructions a NULL. Cookies, placement and the geo columns are NULL for whole
  batches on many stores (no cookie allowlist, no ad blocks, no GeoIP database). The
  search for such columns stops at a column's first value: a column set in the batch's
  first rows costs next to nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import is_not, itemgetter
from typing import Any

from collector.storage.base import HIT_COLUMNS, HitRow, Statement

_PIXEL_WIDTH = HIT_COLUMNS.index("event_id")
_app_part = itemgetter(slice(_PIXEL_WIDTH, None))
_NO_APP_FIELDS = (None,) * (len(HIT_COLUMNS) - _PIXEL_WIDTH)
_COLUMN = [itemgetter(k) for k in range(len(HIT_COLUMNS))]
# Columns with a default other than NULL are always bound: left out, a None there would
# be stored as the default instead of failing its NOT NULL (0001: source 'web').
_BOUND = frozenset({HIT_COLUMNS.index("source")})
# Leaving columns out means picking the others one by one (``itemgetter`` of each
# index), ~1,900 instructions a row more than one slice; each NULL bound costs ~700
# (cachegrind, session 13). So it pays from three NULL columns on.
_LEAVE_OUT_FROM = 3


def hit_inserts(hits: Sequence[HitRow]) -> list[Statement]:
    """The inserts for a batch's hits: pixel hits and app events apart, each without
    the columns that are NULL in all of its rows."""
    if not hits:
        return []
    app = list(map(_app_part, hits))
    if app.count(_NO_APP_FIELDS) == len(app):
        return [_insert(hits, _PIXEL_WIDTH)]
    pixel = [h for h, a in zip(hits, app, strict=True) if a == _NO_APP_FIELDS]
    full = [h for h, a in zip(hits, app, strict=True) if a != _NO_APP_FIELDS]
    return [_insert(rows, width) for rows, width in ((pixel, _PIXEL_WIDTH), (full, 0)) if rows]


def _insert(rows: Sequence[HitRow], width: int) -> Statement:
    """One INSERT for ``rows`` over their first ``width`` columns (0: all), without
    those that are NULL in every row if there are ``_LEAVE_OUT_FROM`` of them."""
    columns = range(width or len(HIT_COLUMNS))
    null = {
        k
        for k in columns
        if k not in _BOUND and not any(map(is_not, map(_COLUMN[k], rows), repeat(None)))
    }
    if len(null) < _LEAVE_OUT_FROM:
        null = set()
    kept = tuple(k for k in columns if k not in null)
    sql, values = _statement(kept)
    return sql, list(map(values, rows))


@functools.lru_cache(maxsize=64)
def _statement(kept: tuple[int, ...]) -> tuple[str, Callable[[HitRow], tuple[Any, ...]]]:
    """The SQL that inserts the columns ``kept``, and what picks their values from a row
    as a plain tuple: one slice for a run from the first column, else one item each."""
    names = ", ".join(HIT_COLUMNS[k] for k in kept)
    sql = f"INSERT INTO hits ({names}) VALUES ({', '.join('?' * len(kept))})"
    if kept == tuple(range(len(kept))):
        return sql, itemgetter(slice(0, len(kept)))
    if len(kept) == 1:  # itemgetter of one index returns the value, not a tuple
        only = kept[0]
        return sql, lambda row: (row[only],)
    return sql, itemgetter(*kept)
