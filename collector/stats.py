"""Analyst statistics read from the rollups: summary, time series, top-N, consent rate.

Only aggregates leave this module (3.4, 6.2.2): every group or time bucket whose distinct
visitors may be fewer than ``k`` (``stats.min_visitors``) is suppressed: top-N groups
are merged into "other", time buckets lose their numbers. The test is the popcount of
the OR-merged visitor bitmap, a lower bound of the distinct visitors, so the error can
only hide more. Used by the API (``collector/api/stats.py``) and the CLI alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from collector.dimensions import (
    CROSS_DIMENSIONS,
    CROSS_FILTERS,
    DIMENSIONS,
    FILTERS,
    HOURLY,
    SKETCHED,
)
from collector.errors import InputError
from collector.rollups import DAY_MS, HLL_M, HOUR_MS, month_of, next_month
from collector.storage.base import Storage

__all__ = ["DIMENSIONS", "FILTERS", "Query", "breakdown", "consent", "parse_query"]

Granularity = Literal["hour", "day"]
DEFAULT_DAYS = 30
MAX_DAYS = 3660
MAX_HOUR_DAYS = 92
MAX_LIMIT = 1000
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Hits are unix milliseconds, so nothing lies before 1970; the last year stops short of
# date.max so that the day and month after any range stay representable.
MIN_DATE, MAX_DATE = "1970-01-01", "9998-12-31"
DATE_PATTERN = r"^(19[7-9]\d|[2-8]\d{3}|9[0-8]\d{2}|99[0-8]\d)-"
_ALPHA = 0.7213 / (1 + 1.079 / HLL_M)


@dataclass(frozen=True, slots=True)
class Query:
    """A validated statistics request: [start, end) in ms plus the options."""

    date_from: str
    date_to: str
    granularity: Granularity = "day"
    by: str = "page"
    limit: int = 10
    filter_dim: str = ""
    filter_value: str = ""

    @property
    def start(self) -> int:
        return _day_ms(self.date_from)

    @property
    def end(self) -> int:
        return _day_ms(self.date_to) + DAY_MS

    def echo(self) -> dict[str, Any]:
        """The request as understood, returned with every answer."""
        return {
            "from": self.date_from,
            "to": self.date_to,
            "granularity": self.granularity,
            "filter": {self.filter_dim: self.filter_value} if self.filter_dim else {},
        }


def _day_ms(day: str) -> int:
    d = dt.date.fromisoformat(day)
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp() * 1000)


def shift(day: str, days: int) -> str:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=days)).isoformat()


def _date(params: Mapping[str, str], name: str, default: str) -> str:
    raw = params.get(name) or default
    if not _DATE.match(raw):
        raise InputError(f"{name}: expected a date YYYY-MM-DD, got {raw[:40]!r}")
    try:
        dt.date.fromisoformat(raw)
    except ValueError:
        raise InputError(f"{name}: not a calendar date: {raw!r}") from None
    if not MIN_DATE <= raw <= MAX_DATE:
        raise InputError(f"{name}: must lie between {MIN_DATE} and {MAX_DATE}, got {raw}")
    return raw


def parse_query(params: Mapping[str, str], today: str | None = None) -> Query:
    """Validate query parameters; an InputError (400) names the first bad one."""
    today = today or dt.datetime.now(dt.UTC).date().isoformat()
    date_to = _date(params, "to", today)
    date_from = _date(params, "from", max(MIN_DATE, shift(date_to, -(DEFAULT_DAYS - 1))))
    days = (dt.date.fromisoformat(date_to) - dt.date.fromisoformat(date_from)).days + 1
    if days < 1:
        raise InputError(f"from: must not be after to ({date_from} > {date_to})")
    if days > MAX_DAYS:
        raise InputError(f"from: the range may span at most {MAX_DAYS} days, got {days}")
    granularity = params.get("granularity") or "day"
    if granularity not in ("hour", "day"):
        raise InputError(f"granularity: expected hour or day, got {granularity[:20]!r}")
    if granularity == "hour" and days > MAX_HOUR_DAYS:
        raise InputError(f"granularity: hour allows at most {MAX_HOUR_DAYS} days, got {days}")
    by = params.get("by") or "page"
    if by not in DIMENSIONS:
        raise InputError(f"by: expected one of {', '.join(DIMENSIONS)}, got {by[:40]!r}")
    raw_limit = params.get("limit") or "10"
    try:
        limit = int(raw_limit)
    except ValueError:
        raise InputError(f"limit: expected an integer, got {raw_limit[:20]!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InputError(f"limit: must be between 1 and {MAX_LIMIT}, got {limit}")
    given = [(name, params[name]) for name in FILTERS if params.get(name)]
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise InputError(f"{given[1][0]}: at most one filter per query, got {names}")
    filter_dim, filter_value = given[0] if given else ("", "")
    if len(filter_value) > 512:
        raise InputError(f"{filter_dim}: at most 512 characters")
    return Query(
        date_from=date_from,
        date_to=date_to,
        granularity=granularity,  # type: ignore[arg-type]
        by=by,
        limit=limit,
        filter_dim=filter_dim,
        filter_value=filter_value,
    )


def _visitors_lower_bound(bits: int) -> int:
    return bits.bit_count()


def hll_estimate(registers: int, inverse_sum: float) -> int:
    """Cardinality from a merged sketch: touched registers and sum(2^-rho) over them."""
    zeros = HLL_M - registers
    estimate = _ALPHA * HLL_M * HLL_M / (inverse_sum + zeros)
    if estimate <= 2.5 * HLL_M and zeros > 0:
        estimate = HLL_M * math.log(HLL_M / zeros)
    return round(estimate)


_INV = "SUM(1.0 / (CAST(1 AS BIGINT) << rho))"


def spans(start: int, end: int) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """Split [start, end) into day ranges at the edges and one range of whole months.

    A year then reads 12 month rows per value plus at most ~60 day rows.
    """
    first = month_of(start)
    if first < start:
        first = next_month(first)
    last = month_of(end) if end > first else first
    if last <= first:
        return [(start, end)], None
    days = [(lo, hi) for lo, hi in ((start, first), (last, end)) if lo < hi]
    return days, (first, last)


def _in(values: list[str] | None) -> tuple[str, list[Any]]:
    if values is None:
        return "", []
    return f" AND value IN ({', '.join('?' * len(values))})", list(values)


def _hits_union(q: Query, dim: str, values: list[str] | None = None) -> tuple[str, list[Any]]:
    """SQL for (value, hits, vbits) rows covering the range: whole months from the month
    rollup, the edges from day rows; with a filter, the (daily) cross rollup."""
    cond, vargs = _in(values)
    if q.filter_dim and dim != q.filter_dim:
        return (
            "SELECT value, hits, vbits FROM rollup_hits WHERE fdim = ? AND fvalue = ? "
            f"AND dim = ? AND grain = 'day' AND bucket >= ? AND bucket < ?{cond}",
            [q.filter_dim, q.filter_value, dim, q.start, q.end, *vargs],
        )
    days, months = spans(q.start, q.end)
    parts: list[str] = []
    args: list[Any] = []
    for lo, hi in days:
        parts.append(
            "SELECT value, hits, vbits FROM rollup_hits WHERE fdim = '' AND fvalue = '' "
            f"AND dim = ? AND grain = 'day' AND bucket >= ? AND bucket < ?{cond}"
        )
        args += [dim, lo, hi, *vargs]
    if months:
        parts.append(
            "SELECT value, hits, vbits FROM rollup_month WHERE dim = ? AND month >= ? "
            f"AND month < ?{cond}"
        )
        args += [dim, *months, *vargs]
    return " UNION ALL ".join(parts), args


async def _visitors(storage: Storage, dim: str, values: list[str], q: Query) -> dict[str, int]:
    """Distinct visitors per value over the range: HLL sketches merged (MAX per register)."""
    if dim not in SKETCHED or not values:
        return {}
    cond, vargs = _in(values)
    days, months = spans(q.start, q.end)
    parts: list[str] = []
    args: list[Any] = []
    for lo, hi in days:
        parts.append(
            f"SELECT value, reg, rho FROM rollup_hll WHERE dim = ? AND day >= ? AND day < ?{cond}"
        )
        args += [dim, lo, hi, *vargs]
    if months:
        parts.append(
            "SELECT value, reg, rho FROM rollup_hll_month WHERE dim = ? AND month >= ? "
            f"AND month < ?{cond}"
        )
        args += [dim, *months, *vargs]
    rows = await storage.fetch_all(
        "SELECT value, COUNT(*) AS n, SUM(1.0 / (CAST(1 AS BIGINT) << r)) AS z FROM ("
        f"SELECT value, reg, MAX(rho) AS r FROM ({' UNION ALL '.join(parts)}) u "
        "GROUP BY value, reg) m GROUP BY value",
        args,
    )
    return {r["value"]: hll_estimate(int(r["n"]), float(r["z"])) for r in rows}


def _series_target(q: Query) -> tuple[str, str]:
    return (q.filter_dim, q.filter_value) if q.filter_dim else ("total", "")


async def timeseries(storage: Storage, q: Query, k: int) -> dict[str, Any]:
    """Hits (and, per day, unique visitors) per bucket; every bucket of the range listed."""
    dim, value = _series_target(q)
    if q.granularity == "hour" and dim not in HOURLY:
        raise InputError(f"{dim}: hourly series cannot be filtered by {dim}; use granularity=day")
    step = HOUR_MS if q.granularity == "hour" else DAY_MS
    rows = await storage.fetch_all(
        "SELECT bucket, hits, vbits FROM rollup_hits WHERE fdim = '' AND fvalue = '' "
        "AND dim = ? AND grain = ? AND value = ? AND bucket >= ? AND bucket < ?",
        [dim, q.granularity, value, q.start, q.end],
    )
    found = {int(r["bucket"]): (int(r["hits"]), int(r["vbits"])) for r in rows}
    visitors: dict[int, int] = {}
    if q.granularity == "day" and dim in SKETCHED:
        for r in await storage.fetch_all(
            f"SELECT day, COUNT(*) AS n, {_INV} AS z FROM rollup_hll "
            "WHERE dim = ? AND value = ? AND day >= ? AND day < ? GROUP BY day",
            [dim, value, q.start, q.end],
        ):
            visitors[int(r["day"])] = hll_estimate(int(r["n"]), float(r["z"]))
    items = []
    for bucket in range(q.start, q.end, step):
        hits, bits = found.get(bucket, (0, 0))
        item: dict[str, Any] = {"t": _iso(bucket, q.granularity), "hits": hits}
        item["visitors"] = visitors.get(bucket, 0) if q.granularity == "day" else None
        if dim not in SKETCHED:
            item["visitors"] = None
        item["suppressed"] = 0 < _visitors_lower_bound(bits) < k
        if item["suppressed"]:
            item["hits"] = item["visitors"] = None
        items.append(item)
    return {"query": q.echo(), "k": k, "items": items, "count": len(items)}


async def summary(storage: Storage, q: Query, k: int) -> dict[str, Any]:
    """Totals over the range: hits, unique visitors, consent rate."""
    dim, value = _series_target(q)
    sql, args = _hits_union(q, dim, [value])
    rows = await storage.fetch_all(sql, args)
    hits = sum(int(r["hits"]) for r in rows)
    bits = 0
    for r in rows:
        bits |= int(r["vbits"])
    visitors = (await _visitors(storage, dim, [value], q)).get(value, 0)
    suppressed = 0 < _visitors_lower_bound(bits) < k
    rate = None
    if q.filter_dim in ("", "page"):
        rate = (await consent(storage, q))["total"]["rate"]
    return {
        "query": q.echo(),
        "k": k,
        "hits": None if suppressed else hits,
        "visitors": None if suppressed or dim not in SKETCHED else visitors,
        "consent_rate": rate,
        "suppressed": suppressed,
    }


async def breakdown(storage: Storage, q: Query, k: int) -> dict[str, Any]:
    """Top ``limit`` values of ``by``; groups under k visitors merge into "other"."""
    if q.filter_dim:
        if q.filter_dim not in CROSS_FILTERS:
            raise InputError(
                f"{q.filter_dim}: breakdowns can be filtered by {', '.join(CROSS_FILTERS)} only"
            )
        if q.by not in CROSS_DIMENSIONS or q.by == q.filter_dim:
            raise InputError(
                f"by: with a {q.filter_dim} filter, group by one of "
                + ", ".join(d for d in CROSS_DIMENSIONS if d != q.filter_dim)
            )
    total_dim, total_value = _series_target(q)
    unfiltered = dataclasses.replace(q, filter_dim="", filter_value="")
    total_sql, total_args = _hits_union(unfiltered, total_dim, [total_value])
    total_row = await storage.fetch_one(
        f"SELECT SUM(hits) AS hits FROM ({total_sql}) u", total_args
    )
    total = int(total_row["hits"]) if total_row and total_row["hits"] is not None else 0
    ranked_sql, ranked_args = _hits_union(q, q.by)
    shown: list[dict[str, Any]] = []
    suppressed = 0
    offset = 0
    batch = q.limit * 2 + 10
    while len(shown) < q.limit:
        candidates = await storage.fetch_all(
            f"SELECT value, SUM(hits) AS hits FROM ({ranked_sql}) u "
            "GROUP BY value ORDER BY SUM(hits) DESC, value LIMIT ? OFFSET ?",
            [*ranked_args, batch, offset],
        )
        if not candidates:
            break
        offset += len(candidates)
        bits_sql, bits_args = _hits_union(q, q.by, [c["value"] for c in candidates])
        bits: dict[str, int] = {}
        for r in await storage.fetch_all(bits_sql, bits_args):
            bits[r["value"]] = bits.get(r["value"], 0) | int(r["vbits"])
        for c in candidates:
            if _visitors_lower_bound(bits.get(c["value"], 0)) < k:
                suppressed += 1
            elif len(shown) < q.limit:
                shown.append({"value": c["value"], "hits": int(c["hits"])})
        if len(candidates) < batch:
            break
    if not q.filter_dim:
        visitors = await _visitors(storage, q.by, [s["value"] for s in shown], q)
        for s in shown:
            s["visitors"] = visitors.get(s["value"]) if q.by in SKETCHED else None
    else:
        for s in shown:
            s["visitors"] = None
    for s in shown:
        s["share"] = round(s["hits"] / total, 4) if total else None
    other = total - sum(s["hits"] for s in shown)
    return {
        "query": {**q.echo(), "by": q.by, "limit": q.limit},
        "k": k,
        "total": total,
        "items": shown,
        "count": len(shown),
        "other": {"hits": other, "share": round(other / total, 4) if total else None},
        "suppressed_groups": suppressed,
    }


_STATES = ("granted", "refused", "absent", "invalid")


async def consent(storage: Storage, q: Query) -> dict[str, Any]:
    """Consent rate from the anonymous counters: granted / all pixel requests, per day."""
    if q.filter_dim not in ("", "page"):
        raise InputError(f"{q.filter_dim}: the consent rate can be filtered by page only")
    sql = "SELECT day, consent, SUM(hits) AS hits FROM pixel_counts WHERE day >= ? AND day <= ?"
    args: list[Any] = [q.date_from, q.date_to]
    if q.filter_dim == "page":
        sql += " AND path = ?"
        args.append(q.filter_value)
    rows = await storage.fetch_all(sql + " GROUP BY day, consent", args)
    days: dict[str, dict[str, int]] = {}
    for r in rows:
        days.setdefault(r["day"], dict.fromkeys(_STATES, 0))[r["consent"]] = int(r["hits"])
    items = []
    totals = dict.fromkeys(_STATES, 0)
    day = q.date_from
    while day <= q.date_to:
        counts = days.get(day, dict.fromkeys(_STATES, 0))
        for state in _STATES:
            totals[state] += counts.get(state, 0)
        items.append({"day": day, **counts, "rate": _rate(counts)})
        day = shift(day, 1)
    return {
        "query": q.echo(),
        "total": {**totals, "rate": _rate(totals)},
        "items": items,
        "count": len(items),
    }


def _rate(counts: Mapping[str, int]) -> float | None:
    seen = sum(counts.get(s, 0) for s in _STATES)
    return round(counts.get("granted", 0) / seen, 4) if seen else None


def _iso(bucket: int, granularity: Granularity) -> str:
    moment = dt.datetime.fromtimestamp(bucket / 1000, dt.UTC)
    if granularity == "day":
        return moment.date().isoformat()
    return moment.strftime("%Y-%m-%dT%H:00Z")
