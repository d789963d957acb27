"""Per-IP and per-network statistics (3.3.2 fraud control and troubleshooting, 4.1.4).

Kept on write by ``IpStatsAggregator`` in the batch writer's transactions (summed over
up to ``storage.aggregate_batches`` batches by SQLite's writer process), per UTC day:
hits, bot hits, hits without a page, first and last seen (``ipstat_daily``), hits per
minute (``ipstat_minute``; the day's peak per minute is their maximum, taken when read),
and exact distinct visitor ids, user agents and countries per IP and network, and IPs
and countries per visitor id (``ipstat_values``, one row per value, ``ON CONFLICT DO
NOTHING``; counted when read; a network's distinct IPs are its IPs' daily rows). Every
statement is a plain ``VALUES`` upsert that adds to what is there, grouped by (day,
scope, subject) within the batch and sorted by key, so that concurrent writers
(processes, nodes) lock rows in the same order and stay exact.

Blocked subjects (6.2.4) are not checked here: per row, that guard cost more than the
rest of the aggregation. They are kept out by the writer's filters
(``BatchWriter.filters``, fed by the governance block list) before a batch reaches
storage, and ``rebuild`` recomputes the affected days from the visible raw hits after
every block, release or erasure. A hit that is written in the moment between a block
being recorded and the writer's block list picking it up is therefore counted until
that rebuild runs; the governance code rebuilds after the list has settled.

Duplicates within one batch are dropped in memory. A returning visitor's value row is
usually stored already: ``window`` (used by the SQLite writer) leaves out the rows this
process wrote before. ``rebuild``, ``purge`` and erasure (``subjects.erase``; run by
another connection, process or node) delete value rows, and a cache that still believed in them
would skip their re-insertion and undercount, so each of them bumps the rewrite
generation (``collector.rewrites``) in its transaction, and the writer empties the cache
when it sees the generation move.

Requests without statistics consent reach ``ipstat_unconsented`` only when
``[ipstats] without_consent`` is on: IP, hit and bot counts and the minute peak, nothing
else, purged after ``without_consent_days`` (see docs/IP-STATISTICS.md). Those counters
have no raw rows behind them and cannot be rebuilt.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from operator import attrgetter
from typing import Any, NamedTuple

from collector import rewrites
from collector.config import Settings
from collector.fraud import crawler_of
from collector.storage.base import Batch, Dialect, HitRow, Statement, Transaction
from collector.storage.keys import walk
from collector.visibility import AGGREGATED, VISIBLE

DAY_MS = 86_400_000
MINUTE_MS = 60_000
_PURGE_EVERY_S = 600.0
_REBUILD_PAGE = 5000
_TABLES = ("ipstat_daily", "ipstat_minute", "ipstat_values")
# Tables whose key starts with (day, ip): ``by_ip`` finds an address's rows in them.
DAY_KEYED = frozenset((*_TABLES, "ipstat_unconsented"))


def by_ip(table: str) -> str:
    """``ip = ? AND day IN (...)``: an address's rows of a ``DAY_KEYED`` table, read by
    key one day at a time, the days themselves walked on the key (a loose index scan).

    ``ip = ?`` alone scanned the table, and an index on the IP would cost the writer on
    every hit, while the days are few (docs/PERFORMANCE.md, session 8).
    """
    return f"ip = ? AND day IN {walk(table, 'day')}"


def _earliest(table: str, col: str) -> str:
    return f"CASE WHEN excluded.{col} < {table}.{col} THEN excluded.{col} ELSE {table}.{col} END"


def _latest(table: str, col: str) -> str:
    return f"CASE WHEN excluded.{col} > {table}.{col} THEN excluded.{col} ELSE {table}.{col} END"


# PostgreSQL rejects a bare column in DO UPDATE: the old value is always table-qualified.
_UPSERT_DAILY = (
    "INSERT INTO ipstat_daily (day, ip, net, hits, bot_hits, no_page_hits, first_ms, last_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, ip) DO UPDATE SET "
    "hits = ipstat_daily.hits + excluded.hits, "
    "bot_hits = ipstat_daily.bot_hits + excluded.bot_hits, "
    "no_page_hits = ipstat_daily.no_page_hits + excluded.no_page_hits, "
    f"first_ms = {_earliest('ipstat_daily', 'first_ms')}, "
    f"last_ms = {_latest('ipstat_daily', 'last_ms')}"
)
_UPSERT_MINUTE = (
    "INSERT INTO ipstat_minute (day, ip, minute, net, hits) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (day, ip, minute) DO UPDATE SET hits = ipstat_minute.hits + excluded.hits"
)
_INSERT_VALUE = (
    "INSERT INTO ipstat_values (day, ip, visitor, ua, country, botfamily, net) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
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


# The same fields as a plain tuple, in C (the writer's path: ~0.4 us a hit less).
_fact_fields = attrgetter(*Fact._fields)


Combo = tuple[str, str, str, str, str, str]


def statements(facts: Iterable[Fact]) -> list[Statement]:
    """Upserts that add ``facts`` to the per-IP statistics (networks and visitor ids are
    derived from these rows when read).

    Hits are summed per (day, IP) and per (day, IP, minute), and their distinct value
    combinations collected, in memory; each row is then one plain ``VALUES`` upsert,
    and each statement's rows are sorted by key.
    """
    acc = _Accumulator()
    acc.add(facts)
    return acc.result(frozenset())[0]


class _Accumulator:
    """Per-IP sums and distinct value combinations of the facts added so far (one batch,
    or the several batches of a writer's aggregation window)."""

    def __init__(self) -> None:
        self.days: dict[int, str] = {}
        # (day, ip) -> [hits, bot hits, no-page hits, first_ms, last_ms]
        self.per_ip: dict[tuple[str, str], list[int]] = {}
        self.per_minute: Counter[tuple[str, str, int]] = Counter()
        self.combos: set[Combo] = set()

    def add(self, facts: Iterable[tuple[Any, ...]]) -> None:
        days, per_ip, per_minute, combos = self.days, self.per_ip, self.per_minute, self.combos
        for ts, ip, vid, ua, family, device, page, country in facts:
            key_day = ts // DAY_MS
            day = days.get(key_day)
            if day is None:
                day = days[key_day] = day_of(ts)
            key = (day, ip)
            row = per_ip.get(key)
            if row is None:
                row = per_ip[key] = [0, 0, 0, ts, ts]
            row[0] += 1
            if ts < row[3]:
                row[3] = ts
            elif ts > row[4]:
                row[4] = ts
            per_minute[(day, ip, ts // MINUTE_MS)] += 1
            bot = device == "bot"
            if bot:
                row[1] += 1
            if not page:
                row[2] += 1
            combos.add((day, ip, vid, ua_key(ua), country or "", family if bot else ""))

    def result(self, known: set[Combo] | frozenset[Combo]) -> tuple[list[Statement], set[Combo]]:
        """The upserts, leaving out value rows in ``known``; also the combinations kept."""
        combos = self.combos
        if not self.per_ip:
            return [], combos
        if known:
            # Membership tests only: ``known`` may grow from another thread meanwhile.
            combos = {c for c in combos if c not in known}
        # Sorted by primary key (net follows from ip), so that concurrent PostgreSQL
        # writers take row locks in one order.
        return [
            (
                _UPSERT_DAILY,
                sorted((day, ip, network_of(ip), *row) for (day, ip), row in self.per_ip.items()),
            ),
            (
                _UPSERT_MINUTE,
                sorted(
                    (day, ip, m, network_of(ip), n) for (day, ip, m), n in self.per_minute.items()
                ),
            ),
            (_INSERT_VALUE, sorted((*c, network_of(c[1])) for c in combos)),
        ], combos


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
    """The ``Aggregator`` for IP statistics; also purges expired unconsented counters.

    Called plainly it is a pure function of the batch (PostgreSQL). ``window`` (for a
    storage that reads ``generation_sql`` inside each batch transaction, like SQLite's)
    aggregates one batch or several and also leaves out the value rows this process
    stored before under the same rewrite generation; ``per_batch`` is then what each
    batch must still write itself.
    """

    generation_sql = rewrites.GENERATION_SQL
    _LIMIT = 8192  # known value rows, ~2.5 MB (RSS budget); emptying costs re-sending

    def __init__(self, settings: Settings) -> None:
        self.keep_days = settings.ipstats.without_consent_days
        self._purged = 0.0
        self._generation: int | None = None
        self._known: set[Combo] = set()

    def __call__(self, batch: Batch, dialect: Dialect) -> list[Statement]:
        return self._with(statements(_fact(row) for row in batch.hits), batch)

    def window(self, generation: int) -> _IpWindow:
        """An aggregation window over one or more batches; its statements are valid if
        ``generation`` is current when they run (``base.WindowedAggregator``)."""
        if generation != self._generation:
            self._generation, self._known = generation, set()
        return _IpWindow(self, generation)

    def per_batch(self, batch: Batch) -> list[Statement]:
        """What cannot wait for a window: the unconsented counters have no raw rows
        behind them, so a window lost in a crash could not be caught up for them."""
        return self._with([], batch)

    def _remember(self, written: set[Combo], generation: int, known: set[Combo]) -> None:
        if generation != self._generation or known is not self._known:
            return  # the cache was reset meanwhile: these rows prove nothing now
        if len(known) + len(written) > self._LIMIT:
            known.clear()
        known.update(written)

    def forget(self) -> None:
        self._generation, self._known = None, set()

    def _with(self, found: list[Statement], batch: Batch) -> list[Statement]:
        if batch.unconsented_ips:
            found += unconsented_statements(batch.unconsented_ips)
        now = time.monotonic()
        if now - self._purged >= _PURGE_EVERY_S:
            # Also when the option was switched off since: what was kept still expires.
            self._purged = now
            found += unconsented_purge(int(time.time() * 1000), self.keep_days)
        return found


class _IpWindow:
    """The consented IP statistics of a writer's window (``IpStatsAggregator.window``)."""

    def __init__(self, owner: IpStatsAggregator, generation: int) -> None:
        self._owner, self._generation, self._known = owner, generation, owner._known
        self._acc = _Accumulator()

    def add(self, hits: Sequence[HitRow]) -> None:
        self._acc.add(map(_fact_fields, hits))

    def statements(self) -> tuple[list[Statement], Callable[[], None]]:
        found, written = self._acc.result(self._known)
        owner, generation, known = self._owner, self._generation, self._known
        return found, lambda: owner._remember(written, generation, known)


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
    await rewrites.bump(tx)  # value rows are deleted: writers' caches are void
    for table in _TABLES:
        await tx.execute(f"DELETE FROM {table} WHERE day >= ? AND day <= ?", [first_day, last_day])
    last_id = 0
    while True:
        found = await tx.fetch_all(
            f"SELECT id, {FACT_COLUMNS} FROM hits WHERE ts_ms >= ? AND ts_ms < ? AND id > ? "
            f"AND {VISIBLE} AND {AGGREGATED} ORDER BY id LIMIT {_REBUILD_PAGE}",
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
    await rewrites.bump(tx)
    for table in _TABLES:
        await tx.execute(f"DELETE FROM {table} WHERE day < ?", [day_of(before_ms)])
