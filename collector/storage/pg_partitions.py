"""Daily RANGE partitions of the PostgreSQL ``hits`` table (``hits_pYYYYMMDD``).

Each partition holds one UTC day of ``ts_ms``. They are created ahead of time (today-1
... today+N) at start and whenever the day turns, and on demand when a batch holds a day
that has none (a replayed spool, a clock far off). Retention (5.1) drops whole
partitions with ``drop_before``: cheap, no vacuum debt, no long DELETE holding locks.

Creation takes a transaction-level advisory lock so that several nodes creating the
same day at once do not trip over each other's ``CREATE TABLE``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable

import asyncpg

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
_LOCK_KEY = 0x636F6C6C_70617274  # "collpart": serialises partition DDL across nodes
_BOUNDS = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")


def day_of(ts_ms: int) -> int:
    """The UTC day number (days since 1970-01-01) that holds ``ts_ms``."""
    return ts_ms // DAY_MS


def partition_name(day: int) -> str:
    return "hits_p" + time.strftime("%Y%m%d", time.gmtime(day * 86_400))


async def existing_days(conn: asyncpg.Connection) -> set[int]:
    """Days that have a partition, read from the catalog (whatever node created them)."""
    rows = await conn.fetch(
        "SELECT pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'hits'::regclass"
    )
    days: set[int] = set()
    for row in rows:
        found = _BOUNDS.search(row["bound"] or "")
        if found:
            days.update(range(day_of(int(found[1])), day_of(int(found[2]) - 1) + 1))
    return days


async def create_days(conn: asyncpg.Connection, days: Iterable[int]) -> set[int]:
    """Create partitions for ``days`` that lack one; the days that now exist."""
    wanted = sorted(set(days))
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        have = await existing_days(conn)
        for day in wanted:
            if day in have:
                continue
            await conn.execute(
                f'CREATE TABLE "{partition_name(day)}" PARTITION OF hits '
                f"FOR VALUES FROM ({day * DAY_MS}) TO ({(day + 1) * DAY_MS})"
            )
            have.add(day)
            logger.info("created hits partition %s", partition_name(day))
    return have


async def drop_before(conn: asyncpg.Connection, ts_ms: int) -> int:
    """Drop every partition whose whole day lies before ``ts_ms``; how many were dropped.

    Rows of the day that contains ``ts_ms`` stay: the caller deletes those by row.
    """
    dropped = 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        rows = await conn.fetch(
            "SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'hits'::regclass"
        )
        for row in rows:
            found = _BOUNDS.search(row["bound"] or "")
            if found and int(found[2]) <= ts_ms:
                await conn.execute(f'DROP TABLE "{row["name"]}"')
                dropped += 1
                logger.info("dropped hits partition %s (retention)", row["name"])
    return dropped
