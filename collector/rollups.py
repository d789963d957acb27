"""Analyst rollups: hits and visitor sketches per hour/day and dimension (issue 4; 3.4, 6.2.2).

Kept **on write**, in the batch writer's transactions (an ``Aggregator``), rather than
by a periodic job: the rollups are exact and lag the hits they summarise by about two
seconds at most (``storage.aggregate_max_age_ms``; the dashboard shows the last minute), there
is no job to schedule, watch or catch up after downtime, and the cost is small because
batches are pre-aggregated in Python first: a batch of 1,000 hits becomes one upsert per
distinct (bucket, dimension, value), not per hit. SQLite's writer process sums up to
``storage.aggregate_batches`` batches before it writes (``SQLiteStorage.write_batch``; a
crash loses none of them).

Dimensions: page (path of the page URL, the same path as ``pixel_counts``), referrer
domain, placement id, browser family, OS family, device class, country and source
(web/app/server), plus ``total``. Tables (migration 0005):

- ``rollup_hits``: hits per bucket and value. One-dimensional per day for every
  dimension and per hour for ``HOURLY``; per day crossed with one filter value
  (``CROSS_FILTERS`` x ``CROSS_DIMENSIONS``), so a query with one filter never reads raw
  hits. Page is left out of the cross product: with thousands of paths it made the
  rollups larger than the hits and writes several times slower (measured, see
  docs/PERFORMANCE.md, "Statistics queries").
- ``vbits`` on every row: a 63-bit linear-counting bitmap of hashed visitor ids, merged by
  OR. Its popcount is a *lower bound* of the distinct visitors (two visitors can share a
  bit, one visitor never sets two), so small-count suppression (k) that trusts it can
  only err towards hiding more.
- ``rollup_hll``: HyperLogLog sketches (p = 9: 512 registers, standard error
  1.04/sqrt(512) = 4.6 %; below ~1,300 visitors linear counting on the registers is used,
  near-exact for small groups) per UTC day and value of the ``SKETCHED`` dimensions,
  stored sparse as one row per touched register and merged across days by MAX(rho).
  Sketches rather than exact visitor tables because rollups outlive the raw hits
  (retention purges hits, rollups stay): a sketch keeps no visitor id, not even a hash
  of one. Page and referrer have no sketch (one row per page and visitor and day would
  again rival the hits table); their visitor counts are not offered.

Hashes are BLAKE2b-64 of the visitor id with a fixed key, so every worker and a rebuild
agree. Blocked subjects (6.2.4): hits dropped by writer filters never reach the
aggregator; after a block, unblock or erasure the governance code calls ``rebuild`` for
the affected range, which recomputes from the hits that are ``VISIBLE``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from collector import rewrites
from collector.dimensions import (
    CROSS_DIMENSIONS,
    CROSS_FILTERS,
    HOURLY,
    SKETCHED,
)
from collector.enrich import referrer_domain
from collector.storage.base import HIT_COLUMNS, Batch, Dialect, HitRow, Statement, Transaction
from collector.visibility import AGGREGATED, VISIBLE

logger = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
HLL_P = 9
HLL_M = 1 << HLL_P
_HLL_REST = 64 - HLL_P
_VBITS = 63  # bits of a signed 64-bit integer that stay positive in both databases
_HASH_KEY = b"collector-rollups-v1"

_UPSERT_HITS = (
    "INSERT INTO rollup_hits (fdim, fvalue, dim, grain, bucket, value, hits, vbits) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (fdim, fvalue, dim, grain, bucket, value) DO UPDATE SET "
    "hits = rollup_hits.hits + excluded.hits, vbits = rollup_hits.vbits | excluded.vbits"
)
_UPSERT_HLL = (
    "INSERT INTO rollup_hll (dim, value, day, reg, rho) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (dim, value, day, reg) DO UPDATE SET rho = excluded.rho "
    "WHERE excluded.rho > rollup_hll.rho"
)

_UPSERT_MONTH = (
    "INSERT INTO rollup_month (dim, month, value, hits, vbits) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (dim, month, value) DO UPDATE SET "
    "hits = rollup_month.hits + excluded.hits, vbits = rollup_month.vbits | excluded.vbits"
)
_UPSERT_HLL_MONTH = (
    "INSERT INTO rollup_hll_month (dim, value, month, reg, rho) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (dim, value, month, reg) DO UPDATE SET rho = excluded.rho "
    "WHERE excluded.rho > rollup_hll_month.rho"
)

HitsKey = tuple[str, str, str, str, int, str]
Visit = tuple[int, str, tuple[str, ...]]  # (day, visitor id, fixed-dimension values)
HllKey = tuple[str, str, int, int]
MonthKey = tuple[str, int, str]


@functools.lru_cache(maxsize=4096)
def month_of(day_ms: int) -> int:
    """Start of the UTC calendar month containing ``day_ms``, in ms."""
    d = dt.datetime.fromtimestamp(day_ms / 1000, dt.UTC)
    return int(dt.datetime(d.year, d.month, 1, tzinfo=dt.UTC).timestamp() * 1000)


def next_month(month_ms: int) -> int:
    return month_of(month_ms + 32 * DAY_MS)


def page_path(page_url: str | None) -> str:
    """The page dimension: the stored URL's path, as ``pixel_counts`` keys it."""
    if not page_url:
        return "(none)"
    try:
        return urlsplit(page_url).path[:256] or "/"
    except ValueError:
        return "(none)"


def dimension_values(hit: HitRow) -> dict[str, str]:
    """The value of every dimension for one hit (missing values get a readable label)."""
    return {
        "total": "",
        "page": page_path(hit.page_url),
        "referrer": referrer_domain(hit.referrer_url),
        "placement": hit.placement_id or "(none)",
        "browser": hit.browser_family or "Other",
        "os": hit.os_family or "Other",
        "device_class": hit.device_class or "other",
        "country": hit.country or "(unknown)",
        "source": hit.source or "web",
    }


def visitor_hash(visitor_id: str) -> int:
    digest = hashlib.blake2b(visitor_id.encode("utf-8"), digest_size=8, key=_HASH_KEY).digest()
    return int.from_bytes(digest, "big")


def hll_register(h: int) -> tuple[int, int]:
    """(register index, rho) of a 64-bit hash: top p bits pick, the rest give rho."""
    rest = h & ((1 << _HLL_REST) - 1)
    return h >> _HLL_REST, _HLL_REST - rest.bit_length() + 1


def vbit(h: int) -> int:
    return 1 << (h % _VBITS)


# The dimensions other than page, in the order of ``_values``; page is kept apart because
# it alone has thousands of values and takes part only one-dimensionally.
_FIXED_DIMS: tuple[str, ...] = ("total", *CROSS_DIMENSIONS)
_FIXED_INDEX = {dim: i for i, dim in enumerate(_FIXED_DIMS)}
_CROSS = tuple(
    (_FIXED_INDEX[f], _FIXED_INDEX[d], f, d)
    for f in CROSS_FILTERS
    for d in CROSS_DIMENSIONS
    if d != f
)
_HOURLY_INDEX = tuple((i, d) for i, d in enumerate(_FIXED_DIMS) if d in HOURLY)
_SKETCHED_INDEX = tuple((i, d) for i, d in enumerate(_FIXED_DIMS) if d in SKETCHED)
_cached_page = functools.lru_cache(maxsize=16_384)(page_path)
_cached_referrer = functools.lru_cache(maxsize=4096)(referrer_domain)


def _values(hit: HitRow) -> tuple[str, ...]:
    """The values of ``_FIXED_DIMS`` for one hit (as ``dimension_values`` names them)."""
    return (
        "",
        _cached_referrer(hit.referrer_url),
        hit.placement_id or "(none)",
        hit.browser_family or "Other",
        hit.os_family or "Other",
        hit.device_class or "other",
        hit.country or "(unknown)",
        hit.source or "web",
    )


# Visitor id -> (vbit, register, rho), a pure function memoised across batches: most
# visitors return, and a keyed BLAKE2b per visitor and batch was ~0.8 us per hit. A
# plain dict read inline is ~0.25 us a hit cheaper than an lru_cache call.
_BITS: dict[str, tuple[int, int, int]] = {}
_BITS_LIMIT = 8192  # ~2 MB (the process's RSS budget is tight: docs/PERFORMANCE.md)


def _visitor_bits(visitor_id: str) -> tuple[int, int, int]:
    found = _BITS.get(visitor_id)
    if found is None:
        h = visitor_hash(visitor_id)
        reg, rho = hll_register(h)
        if len(_BITS) >= _BITS_LIMIT:
            _BITS.clear()
        found = _BITS[visitor_id] = (vbit(h), reg, rho)
    return found


class RegisterCache:
    """HyperLogLog registers this process knows to be stored at least this high.

    An upsert of a register can only raise it (``MAX``), so a batch may leave out every
    register whose stored value is already >= its own: on a store where most visitors
    return, that is nearly all of them. Valid only while no rewrite lowered stored
    registers: ``rebuild`` and ``derive_months`` bump the rewrite generation
    (``collector.rewrites``) in their own transaction, the batch writer reads it inside
    each batch transaction, and on any change it empties the cache and prepares the
    batch again without it (``SQLiteStorage.write_batch``). Entries are only added after the
    batch that wrote them committed, under the generation it read.

    Month rows need no entries of their own: a month register is the maximum of its day
    registers on every path (written beside them, or derived from them), so a day
    register known high enough proves its month register is too.
    """

    # Sizes keep the caches to a few MB: the writer's process has an RSS budget (200 MB
    # over a million hits, soak test). Emptying a full cache only costs re-sending.
    # 32k registers hold a day's sketches on the bench mix (18k rows; 16k thrashed and
    # cost 3%); 8k visits roughly the returning visitors of the last few batches.
    _LIMIT = 32_768
    _VISITS_LIMIT = 8192

    def __init__(self) -> None:
        self.generation: int | None = None
        self.known: dict[HllKey, int] = {}
        # (day, visitor id, values) whose every register is known: one set lookup
        # instead of one dict lookup per sketched dimension.
        self.visits: set[Visit] = set()

    def reset(self, generation: int) -> None:
        self.generation = generation
        self.known = {}
        self.visits = set()

    def merge(self, written: dict[HllKey, int], visits: set[Visit], generation: int) -> None:
        """After a commit: ``written`` registers are stored at least this high, and so
        every register of ``visits`` (written now or known before)."""
        if generation != self.generation:
            return  # written under an older generation: proves nothing now
        known = self.known
        if len(known) + len(written) > self._LIMIT:
            known.clear()
            self.visits = set()
        for key, rho in written.items():
            if known.get(key, 0) < rho:
                known[key] = rho
        if len(self.visits) + len(visits) > self._VISITS_LIMIT:
            self.visits = set()
        self.visits |= visits


class Accumulator:
    """Pre-aggregates hits in Python: one entry per distinct rollup key.

    Per hit it only counts the hour's combination of fixed-dimension values (hits and
    visitor bits), the page, and the (day, visitor, values) it saw for the sketches.
    Combinations are expanded into rollup keys -- ~40 each -- once per batch in
    ``statements``, and month rows are derived from day rows there too. A batch of 2,000
    realistic hits has ~330 combinations against ~1,650 (hour, visitor, values)
    signatures, which is what it expanded before (docs/PERFORMANCE.md, issue 8).

    ``known`` and ``visits`` (a ``RegisterCache``'s entries) leave out registers already
    stored at least as high; ``written`` holds the day registers the statements raise.
    """

    def __init__(
        self, known: dict[HllKey, int] | None = None, visits: set[Visit] | None = None
    ) -> None:
        self._cells: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        self._visits: set[Visit] = set()
        self._known_visits = visits or set()
        self._pages: dict[tuple[int, str], list[int]] = {}
        self._known = known or {}
        self.written: dict[HllKey, int] = {}

    @property
    def visits(self) -> set[Visit]:
        """The (day, visitor, values) seen; all their registers are stored once the
        statements committed."""
        return self._visits

    def add(self, hit: HitRow) -> None:
        self.add_all((hit,))

    def add_all(self, hits: Iterable[HitRow]) -> None:
        # One loop with everything bound to locals: this runs for every hit (~30% less
        # than a method call per hit with attribute lookups).
        cells, visits, pages = self._cells, self._visits, self._pages
        known_bits, values_of, page_of = _BITS.get, _values, _cached_page
        for hit in hits:
            ts = hit.ts_ms
            vid = hit.visitor_id
            bit = (known_bits(vid) or _visitor_bits(vid))[0]
            values = values_of(hit)
            key = (ts - ts % HOUR_MS, values)
            cell = cells.get(key)
            if cell is None:
                cells[key] = [1, bit]
            else:
                cell[0] += 1
                cell[1] |= bit
            day = ts - ts % DAY_MS
            visits.add((day, vid, values))
            page_key = (day, page_of(hit.page_url))
            cell = pages.get(page_key)
            if cell is None:
                pages[page_key] = [1, bit]
            else:
                cell[0] += 1
                cell[1] |= bit

    def _expand(
        self,
    ) -> tuple[dict[HitsKey, list[int]], dict[HllKey, int]]:
        acc: dict[HitsKey, list[int]] = {}
        hll: dict[HllKey, int] = {}

        def bump(key: HitsKey, n: int, bit: int) -> None:
            cell = acc.get(key)
            if cell is None:
                acc[key] = [n, bit]
            else:
                cell[0] += n
                cell[1] |= bit

        for (day, page), (n, bits) in self._pages.items():
            bump(("", "", "page", "day", day, page), n, bits)
        for (hour, values), (n, bits) in self._cells.items():
            day = hour - hour % DAY_MS
            for i, dim in enumerate(_FIXED_DIMS):
                bump(("", "", dim, "day", day, values[i]), n, bits)
            for i, dim in _HOURLY_INDEX:
                bump(("", "", dim, "hour", hour, values[i]), n, bits)
            for fi, di, fdim, dim in _CROSS:
                bump((fdim, values[fi], dim, "day", day, values[di]), n, bits)
        known, known_visits = self._known, self._known_visits
        for visit in self._visits:
            if visit in known_visits:
                continue
            day, vid, values = visit
            _, reg, rho = _visitor_bits(vid)
            for i, dim in _SKETCHED_INDEX:
                hkey = (dim, values[i], day, reg)
                if known.get(hkey, 0) < rho and hll.get(hkey, 0) < rho:
                    hll[hkey] = rho
        return acc, hll

    def statements(self, *, months: bool = True) -> list[Statement]:
        """Upserts for everything added; ``months=False`` leaves the month rows out
        (a rebuild derives them from the day rows instead)."""
        acc, hll = self._expand()
        self.written = hll
        out: list[Statement] = []
        if acc:
            out.append((_UPSERT_HITS, [(*k, v[0], v[1]) for k, v in acc.items()]))
        if hll:
            out.append((_UPSERT_HLL, [(*k, rho) for k, rho in hll.items()]))
        if not months:
            return out
        month_cells: dict[MonthKey, list[int]] = {}
        for (fdim, _, dim, grain, bucket, value), (n, bits) in acc.items():
            if fdim == "" and grain == "day":
                mkey = (dim, month_of(bucket), value)
                cell = month_cells.get(mkey)
                if cell is None:
                    month_cells[mkey] = [n, bits]
                else:
                    cell[0] += n
                    cell[1] |= bits
        hll_month: dict[HllKey, int] = {}
        for (dim, value, day, reg), rho in hll.items():
            hkey = (dim, value, month_of(day), reg)
            if hll_month.get(hkey, 0) < rho:
                hll_month[hkey] = rho
        if month_cells:
            out.append((_UPSERT_MONTH, [(*k, v[0], v[1]) for k, v in month_cells.items()]))
        if hll_month:
            out.append((_UPSERT_HLL_MONTH, [(*k, r) for k, r in hll_month.items()]))
        return out


class Rollups:
    """The ``Aggregator`` for analyst rollups (registered in ``collector.aggregates``).

    Called plainly it is a pure function of the batch (PostgreSQL). A storage that reads
    ``generation_sql`` inside each batch transaction may aggregate through ``window``
    instead, over one batch or several, which leaves out registers a ``RegisterCache``
    proves redundant (SQLite does).
    """

    generation_sql = rewrites.GENERATION_SQL

    def __init__(self) -> None:
        self._cache = RegisterCache()

    def __call__(self, batch: Batch, dialect: Dialect) -> Iterable[Statement]:
        acc = Accumulator()
        acc.add_all(batch.hits)
        return acc.statements()

    def window(self, generation: int) -> _RollupWindow:
        """An aggregation window over one or more batches; its statements are valid if
        ``generation`` is current when they run (``base.WindowedAggregator``). It leaves
        out registers the ``RegisterCache`` proves redundant."""
        cache = self._cache
        if cache.generation != generation:
            cache.reset(generation)
        return _RollupWindow(cache, generation)

    def per_batch(self, batch: Batch) -> list[Statement]:
        return []  # every rollup can be recomputed from the raw hits

    def forget(self) -> None:
        self._cache = RegisterCache()


class _RollupWindow:
    """The rollups of a writer's window (``Rollups.window``)."""

    def __init__(self, cache: RegisterCache, generation: int) -> None:
        self._cache, self._generation = cache, generation
        self._acc = Accumulator(cache.known, cache.visits)

    def add(self, hits: Sequence[HitRow]) -> None:
        self._acc.add_all(hits)

    def statements(self) -> tuple[list[Statement], Callable[[], None]]:
        acc, cache, generation = self._acc, self._cache, self._generation
        out = acc.statements()
        written, visits = acc.written, acc.visits
        return out, lambda: cache.merge(written, visits, generation)


async def rebuild(tx: Transaction, from_ms: int, to_ms: int) -> None:
    """Recompute every rollup for the hours/days overlapping [from_ms, to_ms).

    Reads only ``VISIBLE`` hits, so a blocked or erased subject drops out of the rollups
    and an unblocked one comes back (6.2.4); hits a writer's window still holds are
    left to that writer (``AGGREGATED``). Never call it from retention: rollups are
    meant to outlive purged raw hits. Days before the purge floor (``mark_purged``) are
    skipped, since the rollups are the only record of them.
    """
    if to_ms <= from_ms:
        return
    start = from_ms - from_ms % DAY_MS
    end = to_ms + (-to_ms) % DAY_MS
    floor = await purge_floor(tx)
    if start < floor:
        logger.info("rollup rebuild starts at %d, not %d: older raw hits are purged", floor, start)
        start = floor
    if start >= end:
        return
    await rewrites.bump(tx)  # registers may go down: caches are void
    columns = ", ".join(HIT_COLUMNS)
    for day in range(start, end, DAY_MS):
        await _rebuild_day(tx, day, columns)
    await derive_months(tx, start, end)


async def derive_months(tx: Transaction, from_ms: int, to_ms: int) -> None:
    """Recompute the month rows overlapping [from_ms, to_ms) from the day rows.

    A month row is by definition the merge of its day rows, so this is exact, and it
    works for months whose raw hits retention has already purged.
    """
    await rewrites.bump(tx)
    month = month_of(from_ms - from_ms % DAY_MS)
    while month < to_ms:
        nxt = next_month(month)
        await tx.execute("DELETE FROM rollup_month WHERE month = ?", [month])
        await tx.execute("DELETE FROM rollup_hll_month WHERE month = ?", [month])
        merged: dict[tuple[str, str], list[int]] = {}
        for r in await tx.fetch_all(
            "SELECT dim, value, hits, vbits FROM rollup_hits WHERE fdim = '' AND fvalue = '' "
            "AND grain = 'day' AND bucket >= ? AND bucket < ?",
            [month, nxt],
        ):
            cell = merged.setdefault((r["dim"], r["value"]), [0, 0])
            cell[0] += int(r["hits"])
            cell[1] |= int(r["vbits"])
        await tx.executemany(
            _UPSERT_MONTH, [(d, month, v, c[0], c[1]) for (d, v), c in merged.items()]
        )
        await tx.execute(
            "INSERT INTO rollup_hll_month (dim, value, month, reg, rho) "
            "SELECT dim, value, ?, reg, MAX(rho) FROM rollup_hll WHERE day >= ? AND day < ? "
            "GROUP BY dim, value, reg",
            [month, month, nxt],
        )
        month = nxt


async def purge_floor(tx: Transaction) -> int:
    row = await tx.fetch_one("SELECT value FROM rollup_state WHERE name = 'raw_floor_ms'")
    return int(row["value"]) if row else 0


async def mark_purged(tx: Transaction, before_ms: int) -> None:
    """Retention calls this in its purge transaction: raw hits before ``before_ms`` are gone.

    The floor is rounded up to the next UTC day (a partly purged day cannot be rebuilt)
    and only ever moves forward.
    """
    floor = before_ms + (-before_ms) % DAY_MS
    await tx.execute(
        "INSERT INTO rollup_state (name, value) VALUES ('raw_floor_ms', ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value "
        "WHERE excluded.value > rollup_state.value",
        [floor],
    )


async def _rebuild_day(tx: Transaction, day: int, columns: str) -> None:
    nxt = day + DAY_MS
    for sql, params in (
        ("DELETE FROM rollup_hits WHERE grain = 'day' AND bucket = ?", [day]),
        ("DELETE FROM rollup_hits WHERE grain = 'hour' AND bucket >= ? AND bucket < ?", [day, nxt]),
        ("DELETE FROM rollup_hll WHERE day = ?", [day]),
    ):
        await tx.execute(sql, params)
    rows = await tx.fetch_all(
        f"SELECT {columns} FROM hits WHERE ts_ms >= ? AND ts_ms < ? AND {VISIBLE} AND {AGGREGATED}",
        [day, nxt],
    )
    acc = Accumulator()
    acc.add_all(map(_hit_row, rows))
    # month rows are derived afterwards from the day rows, once per month
    for sql, batch_rows in acc.statements(months=False):
        await tx.executemany(sql, batch_rows)


def _hit_row(row: dict[str, Any]) -> HitRow:
    return HitRow(*(row[c] for c in HIT_COLUMNS))
