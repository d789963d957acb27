"""Per-IP and per-network statistics (3.3.2 fraud control and troubleshooting, 4.1.4).

Kept on write by ``IpStatsAggregator`` inside each batch transaction, per UTC day:
hits, bot hits, hits without a page, first and last seen, peak hits per minute
(``ipstat_daily``), and exact distinct visitor ids, user agents, countries and IPs
(``ipstat_values``, one row per value, ``ON CONFLICT DO NOTHING``; counted when read).
Every statement is an upsert that adds to what is there, rows sorted by key so that
concurrent writers (processes, nodes) lock in the same order and stay exact; the peak
is raised from the minute counter after the counter's own upsert, so the last writer
of a minute always sees its full count.

Blocked subjects (6.2.4) are left out on write by a ``NOT EXISTS`` guard on ``blocks``,
the same rule as ``collector.visibility.VISIBLE``; ``rebuild`` recomputes days from the
visible raw hits after a block, a release or an erasure.

Requests without statistics consent reach ``ipstat_unconsented`` only when
``[ipstats] without_consent`` is on: IP, hit and bot counts and the minute peak, nothing
else, purged after ``without_consent_days`` (see docs/IP-STATISTICS.md). Those counters
have no raw rows behind them and cannot be rebuilt.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

from collector.config import Settings
from collector.fraud import crawler_of
from collector.storage.base import Batch, Dialect, HitRow, Statement, Transaction
from collector.visibility import VISIBLE

DAY_MS = 86_400_000
MINUTE_MS = 60_000
_PURGE_EVERY_S = 600.0
_REBUILD_PAGE = 5000

_T = "CAST(? AS TEXT)"
_N = "CAST(? AS BIGINT)"
# The block rule of collector.visibility.VISIBLE for one (ip, visitor id) pair.
_GUARD = (
    "NOT EXISTS (SELECT 1 FROM blocks b WHERE b.released_at IS NULL AND "
    f"((b.kind = 'ip' AND b.value = {_T}) OR (b.kind = 'visitor' AND b.value = {_T})))"
)


def _earliest(table: str, col: str) -> str:
    return f"CASE WHEN excluded.{col} < {table}.{col} THEN excluded.{col} ELSE {table}.{col} END"


def _latest(table: str, col: str) -> str:
    return f"CASE WHEN excluded.{col} > {table}.{col} THEN excluded.{col} ELSE {table}.{col} END"


_UPSERT_DAILY = (
    "INSERT INTO ipstat_daily (day, scope, subject, hits, bot_hits, no_page_hits, first_ms, "
    f"last_ms) SELECT {_T}, {_T}, {_T}, {_N}, {_N}, {_N}, {_N}, {_N} WHERE {_GUARD} "
    "ON CONFLICT (day, scope, subject) DO UPDATE SET "
    "hits = ipstat_daily.hits + excluded.hits, "
    "bot_hits = ipstat_daily.bot_hits + excluded.bot_hits, "
    "no_page_hits = ipstat_daily.no_page_hits + excluded.no_page_hits, "
    f"first_ms = {_earliest('ipstat_daily', 'first_ms')}, "
    f"last_ms = {_latest('ipstat_daily', 'last_ms')}"
)
_UPSERT_MINUTE = (
    "INSERT INTO ipstat_minute (scope, subject, minute, hits) "
    f"SELECT {_T}, {_T}, {_N}, {_N} WHERE {_GUARD} "
    "ON CONFLICT (scope, subject, minute) DO UPDATE SET hits = ipstat_minute.hits + excluded.hits"
)
_RAISE_PEAK = (
    "UPDATE ipstat_daily SET peak_per_minute = COALESCE((SELECT m.hits FROM ipstat_minute m "
    "WHERE m.scope = ipstat_daily.scope AND m.subject = ipstat_daily.subject AND m.minute = ? "
    "AND m.hits > ipstat_daily.peak_per_minute), ipstat_daily.peak_per_minute) "
    "WHERE day = ? AND scope = ? AND subject = ?"
)
_INSERT_VALUE = (
    "INSERT INTO ipstat_values (day, scope, subject, kind, value) "
    f"SELECT {_T}, {_T}, {_T}, {_T}, {_T} WHERE {_GUARD} ON CONFLICT DO NOTHING"
)
_UPSERT_UNCONSENTED = (
    "INSERT INTO ipstat_unconsented (day, ip, hits, bot_hits, crawler_hits, first_ms, last_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, ip) DO UPDATE SET "
    "hits = ipstat_unconsented.hits + excluded.hits, "
    "bot_hits = ipstat_unconsented.bot_hits + excluded.bot_hits, "
    "crawler_hits = ipstat_unconsented.crawler_hits + excluded.crawler_hits, "
    f"first_ms = {_earliest('ipstat_unconsented', 'first_ms')}, "
    f"last_ms = {_latest('ipstat_unconsented', 'last_ms')}"
)
_UPSERT_UNCONSENTED_MINUTE = (
    "INSERT INTO ipstat_unconsented_minute (ip, minute, hits) VALUES (?, ?, ?) "
    "ON CONFLICT (ip, minute) DO UPDATE SET hits = ipstat_unconsented_minute.hits + excluded.hits"
)
_RAISE_UNCONSENTED_PEAK = (
    "UPDATE ipstat_unconsented SET peak_per_minute = COALESCE((SELECT m.hits FROM "
    "ipstat_unconsented_minute m WHERE m.ip = ipstat_unconsented.ip AND m.minute = ? "
    "AND m.hits > ipstat_unconsented.peak_per_minute), ipstat_unconsented.peak_per_minute) "
    "WHERE day = ? AND ip = ?"
)


@lru_cache(maxsize=4096)
def day_of(ts_ms: int) -> str:
    """The UTC day of a timestamp, as stored ('YYYY-MM-DD')."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts_ms // DAY_MS * 86_400))


@lru_cache(maxsize=65_536)
def network_of(ip: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of an address, in CIDR form."""
    addr = ipaddress.ip_address(ip)
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@lru_cache(maxsize=16_384)
def ua_key(user_agent: str) -> str:
    """What ``ipstat_values`` keeps of a user agent: enough to count it, not to read it."""
    return hashlib.sha256(user_agent.encode("utf-8", "replace")).hexdigest()[:16]


class Fact(NamedTuple):
    """The fields of a hit that IP statistics use (from a ``HitRow`` or a stored row)."""

    ts_ms: int
    ip: str
    visitor_id: str
    user_agent: str
    browser_family: str
    device_class: str
    page_url: str | None
    country: str | None


FACT_COLUMNS = ", ".join(Fact._fields)


def _fact(row: HitRow) -> Fact:
    return Fact(
        row.ts_ms,
        row.ip,
        row.visitor_id,
        row.user_agent,
        row.browser_family,
        row.device_class,
        row.page_url,
        row.country,
    )


@dataclass(slots=True)
class _Group:
    """One (day, ip, visitor id) of a batch: the unit the block guard applies to."""

    hits: int = 0
    bots: int = 0
    no_page: int = 0
    first: int = 2**62
    last: int = 0
    uas: set[str] = field(default_factory=set)
    countries: set[str] = field(default_factory=set)
    bot_families: set[str] = field(default_factory=set)
    minutes: Counter[int] = field(default_factory=Counter)


def statements(facts: Iterable[Fact]) -> list[Statement]:
    """Upserts that add ``facts`` to the per-IP, per-network and per-visitor statistics."""
    groups: dict[tuple[str, str, str], _Group] = defaultdict(_Group)
    for f in facts:
        g = groups[(day_of(f.ts_ms), f.ip, f.visitor_id)]
        g.hits += 1
        g.first = min(g.first, f.ts_ms)
        g.last = max(g.last, f.ts_ms)
        g.minutes[f.ts_ms // MINUTE_MS] += 1
        g.uas.add(ua_key(f.user_agent))
        if f.device_class == "bot":
            g.bots += 1
            g.bot_families.add(f.browser_family)
        if not f.page_url:
            g.no_page += 1
        if f.country:
            g.countries.add(f.country)
    if not groups:
        return []
    daily: list[tuple[Any, ...]] = []
    minutes: list[tuple[Any, ...]] = []
    peaks: set[tuple[int, str, str, str]] = set()
    values: set[tuple[str, ...]] = set()
    for (day, ip, vid), g in groups.items():
        net = network_of(ip)
        for scope, subject in (("ip", ip), ("net", net)):
            daily.append((day, scope, subject, g.hits, g.bots, g.no_page, g.first, g.last, ip, vid))
            for minute, n in g.minutes.items():
                minutes.append((scope, subject, minute, n, ip, vid))
                peaks.add((minute, day, scope, subject))
            values.add((day, scope, subject, "visitor", vid, ip, vid))
            values.update((day, scope, subject, "ua", ua, ip, vid) for ua in g.uas)
            values.update((day, scope, subject, "country", c, ip, vid) for c in g.countries)
            values.update((day, scope, subject, "botfamily", b, ip, vid) for b in g.bot_families)
        values.add((day, "net", net, "ip", ip, ip, vid))
        values.add((day, "visitor", vid, "ip", ip, ip, vid))
        values.update((day, "visitor", vid, "country", c, ip, vid) for c in g.countries)
    # Sorted, so that concurrent PostgreSQL writers take row locks in one order.
    return [
        (_UPSERT_DAILY, sorted(daily)),
        (_UPSERT_MINUTE, sorted(minutes)),
        (_RAISE_PEAK, sorted(peaks)),
        (_INSERT_VALUE, sorted(values)),
    ]


def unconsented_statements(items: Sequence[tuple[int, str, str]]) -> list[Statement]:
    """Counters for requests without statistics consent: IP, counts and times only.

    ``items`` are (ts_ms, ip, bot family or ''); the family only decides whether the hit
    counts as a known crawler's or another bot's and is not stored.
    """
    days: dict[tuple[str, str], list[int]] = {}
    minutes: Counter[tuple[str, int]] = Counter()
    for ts_ms, ip, bot_family in items:
        key = (day_of(ts_ms), ip)
        row = days.get(key)
        if row is None:
            days[key] = [0, 0, 0, ts_ms, ts_ms]
            row = days[key]
        row[0] += 1
        if bot_family:
            row[2 if crawler_of(bot_family) else 1] += 1
        row[3] = min(row[3], ts_ms)
        row[4] = max(row[4], ts_ms)
        minutes[(ip, ts_ms // MINUTE_MS)] += 1
    return [
        (_UPSERT_UNCONSENTED, sorted((*key, *row) for key, row in days.items())),
        (_UPSERT_UNCONSENTED_MINUTE, sorted((*key, n) for key, n in minutes.items())),
        (
            _RAISE_UNCONSENTED_PEAK,
            sorted((m, day_of(m * MINUTE_MS), ip) for ip, m in minutes),
        ),
    ]


class IpStatsAggregator:
    """The ``Aggregator`` for IP statistics; also purges expired unconsented counters."""

    def __init__(self, settings: Settings) -> None:
        self.keep_days = settings.ipstats.without_consent_days
        self._purged = 0.0

    def __call__(self, batch: Batch, dialect: Dialect) -> list[Statement]:
        found = statements(_fact(row) for row in batch.hits)
        if batch.unconsented_ips:
            found += unconsented_statements(batch.unconsented_ips)
        now = time.monotonic()
        if now - self._purged >= _PURGE_EVERY_S:
            # Also when the option was switched off since: what was kept still expires.
            self._purged = now
            found += unconsented_purge(int(time.time() * 1000), self.keep_days)
        return found


def unconsented_purge(now_ms: int, keep_days: int) -> list[Statement]:
    """Delete unconsented counters older than ``keep_days`` (whole UTC days)."""
    cutoff = now_ms - keep_days * DAY_MS
    return [
        ("DELETE FROM ipstat_unconsented WHERE day < ?", [(day_of(cutoff),)]),
        ("DELETE FROM ipstat_unconsented_minute WHERE minute < ?", [(cutoff // MINUTE_MS,)]),
    ]


def _day_bounds(from_ms: int, to_ms: int) -> tuple[int, int]:
    return from_ms // DAY_MS * DAY_MS, (to_ms // DAY_MS + 1) * DAY_MS


async def rebuild(tx: Transaction, from_ms: int, to_ms: int) -> None:
    """Recompute the statistics of every UTC day overlapping [from_ms, to_ms] from the
    visible raw hits (after a block, a release or an erasure, 6.2.4).

    The unconsented counters are not touched: they have no raw rows to rebuild from.
    """
    start, end = _day_bounds(from_ms, to_ms)
    first_day, last_day = day_of(start), day_of(end - 1)
    await tx.execute("DELETE FROM ipstat_daily WHERE day >= ? AND day <= ?", [first_day, last_day])
    await tx.execute("DELETE FROM ipstat_values WHERE day >= ? AND day <= ?", [first_day, last_day])
    await tx.execute(
        "DELETE FROM ipstat_minute WHERE minute >= ? AND minute < ?",
        [start // MINUTE_MS, end // MINUTE_MS],
    )
    last_id = 0
    while True:
        found = await tx.fetch_all(
            f"SELECT id, {FACT_COLUMNS} FROM hits WHERE ts_ms >= ? AND ts_ms < ? AND id > ? "
            f"AND {VISIBLE} ORDER BY id LIMIT {_REBUILD_PAGE}",
            [start, end, last_id],
        )
        if not found:
            return
        last_id = found[-1]["id"]
        for sql, rows in statements(Fact(*(r[c] for c in Fact._fields)) for r in found):
            if rows:
                await tx.executemany(sql, rows)


async def purge(tx: Transaction, before_ms: int) -> None:
    """Retention: drop the statistics of days that end before ``before_ms`` (as hits go)."""
    await tx.execute("DELETE FROM ipstat_daily WHERE day < ?", [day_of(before_ms)])
    await tx.execute("DELETE FROM ipstat_values WHERE day < ?", [day_of(before_ms)])
    await tx.execute("DELETE FROM ipstat_minute WHERE minute < ?", [before_ms // MINUTE_MS])


async def erase_subject(tx: Transaction, kind: str, value: str) -> None:
    """Erasure: delete the rows that name an IP or a visitor id directly, the
    unconsented counters included. Counts that merely included the subject (its
    network, other IPs' visitor counts) are corrected by ``rebuild`` over the subject's
    days once its hits are gone.
    """
    if kind == "ip":
        for table in ("ipstat_daily", "ipstat_values"):
            await tx.execute(f"DELETE FROM {table} WHERE scope = 'ip' AND subject = ?", [value])
        await tx.execute("DELETE FROM ipstat_minute WHERE scope = 'ip' AND subject = ?", [value])
        await tx.execute("DELETE FROM ipstat_values WHERE kind = 'ip' AND value = ?", [value])
        await tx.execute("DELETE FROM ipstat_unconsented WHERE ip = ?", [value])
        await tx.execute("DELETE FROM ipstat_unconsented_minute WHERE ip = ?", [value])
    elif kind == "visitor":
        await tx.execute(
            "DELETE FROM ipstat_values WHERE scope = 'visitor' AND subject = ?", [value]
        )
        await tx.execute("DELETE FROM ipstat_values WHERE kind = 'visitor' AND value = ?", [value])
    else:
        raise ValueError(f"kind must be 'ip' or 'visitor', got {kind!r}")
