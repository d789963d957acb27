"""Reading one subject's rows out of a table keyed by (time bucket, subject), on both
backends.

Some tables that the writer fills on every hit with a random subject are keyed by the
time bucket first (the per-IP statistics by day, ``visitor_hours`` by hour), so each
insert lands in the newest part of the B-tree instead of on a random page. A subject's
rows are then read one bucket at a time, a seek per bucket:
``f"subject = ? AND bucket IN {walk(table, 'bucket')}"`` (``walk`` brings its own
parentheses).
"""

from __future__ import annotations


def walk(table: str, column: str) -> str:
    """A subquery of the distinct values of ``column``, the first column of ``table``'s
    key, walked on the key: one seek per value (a loose index scan).

    ``SELECT DISTINCT`` would read every row. SQLite skips through a key's first column
    only with ANALYZE statistics, and PostgreSQL before 18 not at all, so the walk is
    spelled out as a recursive query, which both plan as seeks.
    """
    return (
        f"(WITH RECURSIVE k(v) AS (SELECT min({column}) FROM {table} "
        f"UNION ALL SELECT (SELECT min({column}) FROM {table} WHERE {column} > k.v) FROM k "
        "WHERE k.v IS NOT NULL) SELECT v FROM k WHERE v IS NOT NULL)"
    )
