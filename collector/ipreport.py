"""IP reports for engineers (3.3.2, 4.1.4, 4.1.9): one IP in detail, or the top list.

Shared by ``GET /api/ip...`` and ``collector ip`` so that both print the same thing.
Reads the statistics tables kept by ``collector.ipstats``, scores each day with
``collector.fraud``, and pages through the raw hits for troubleshooting. Aggregates
never include blocked subjects (6.2.4); the raw hit list shows them to admins only.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import defaultdict
from typing import Any, Literal

from collector import subject_hours
from collector.config import FraudSettings
from collector.enrich import normalize_ip
from collector.errors import InputError
from collector.fraud import DayStats, evaluate
from collector.geo import GeoInfo, GeoIP
from collector.ipstats import DAY_MS, by_ip, day_of, network_of
from collector.storage.base import Storage
from collector.visibility import VISIBLE

Kind = Literal["ip", "network"]
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Row ids are signed 64-bit: 18 digits always fit.
CURSOR = re.compile(r"^(\d{1,16})\.(\d{1,18})$")
_HIT_FIELDS = (
    "id, ts_ms, visitor_id, session_id, user_agent, browser_family, browser_version, "
    "os_family, os_version, device_class, page_url, referrer_url, placement_id, country, "
    "region, city, source, consent_id"
)


def parse_ip(text: str) -> str:
    """The canonical address (IPv4-mapped IPv6 folded to IPv4), or a 400 naming it."""
    ip = normalize_ip(text)
    if ip is None or not text.strip():
        raise InputError(f"ip: {text[:64]!r} is not an IPv4 or IPv6 address")
    return ip


def parse_date(text: str | None) -> str | None:
    if not text:
        return None
    if not _DATE.match(text):
        raise InputError(f"date: expected YYYY-MM-DD, got {text[:32]!r}")
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise InputError(f"date: {text!r} is not a calendar date") from None
    return text


def today() -> str:
    return day_of(int(time.time() * 1000))


def iso(ts_ms: int | None) -> str | None:
    if ts_ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms / 1000)) + (f".{ts_ms % 1000:03d}Z")


def geo_dict(geo: GeoInfo) -> dict[str, Any]:
    return dataclasses.asdict(geo)


async def _stats(
    storage: Storage, day: str, scope: str, subject: str | None
) -> dict[str, DayStats]:
    """Every subject's ``DayStats`` for ``day`` (or one subject's).

    The tables hold rows per IP; a network's figures are their sums, maxima and
    distinct counts over its IPs, taken here (see ``collector.ipstats``).
    """
    col = "ip" if scope == "ip" else "net"
    only = f" AND {col} = ?" if subject else ""
    args: list[Any] = [day, *([subject] if subject else [])]
    found: dict[str, DayStats] = defaultdict(DayStats)
    for r in await storage.fetch_all(
        f"SELECT {col} AS subject, SUM(hits) AS hits, SUM(bot_hits) AS bot_hits, "
        "SUM(no_page_hits) AS no_page_hits, MIN(first_ms) AS first_ms, "
        f"MAX(last_ms) AS last_ms, COUNT(*) AS ips FROM ipstat_daily WHERE day = ?{only} "
        f"GROUP BY {col}",
        args,
    ):
        s = found[r["subject"]]
        s.hits, s.bot_hits = int(r["hits"]), int(r["bot_hits"])
        s.no_page_hits = int(r["no_page_hits"])
        s.first_ms, s.last_ms = int(r["first_ms"]), int(r["last_ms"])
        if scope == "net":
            s.ips = int(r["ips"])
    # The peak is the busiest minute of the day, taken here rather than kept on write.
    for r in await storage.fetch_all(
        f"SELECT subject, MAX(n) AS peak FROM (SELECT {col} AS subject, minute, SUM(hits) AS n "
        f"FROM ipstat_minute WHERE day = ?{only} GROUP BY {col}, minute) m GROUP BY subject",
        args,
    ):
        found[r["subject"]].peak_per_minute = int(r["peak"])
    for r in await storage.fetch_all(
        f"SELECT {col} AS subject, COUNT(DISTINCT visitor) AS visitors, "
        f"COUNT(DISTINCT ua) AS uas FROM ipstat_values WHERE day = ?{only} GROUP BY {col}",
        args,
    ):
        s = found[r["subject"]]
        s.visitors, s.user_agents = int(r["visitors"]), int(r["uas"])
    for kind in ("country", "botfamily"):
        for r in await storage.fetch_all(
            f"SELECT DISTINCT {col} AS subject, {kind} AS value FROM ipstat_values "
            f"WHERE day = ?{only} AND {kind} <> '' ORDER BY value",
            args,
        ):
            s = found[r["subject"]]
            (s.countries if kind == "country" else s.bot_families).append(r["value"])
    # The busiest visitor ids behind each subject: how many IPs and countries they used.
    inner_only = (
        f" AND visitor IN (SELECT visitor FROM ipstat_values WHERE day = ? AND {col} = ?)"
        if subject
        else ""
    )
    for r in await storage.fetch_all(
        "SELECT s.subject AS subject, MAX(c.ips) AS ips, MAX(c.countries) AS countries FROM "
        f"(SELECT DISTINCT {col} AS subject, visitor FROM ipstat_values WHERE day = ?{only}) s "
        "JOIN (SELECT visitor, COUNT(DISTINCT ip) AS ips, "
        "COUNT(DISTINCT NULLIF(country, '')) AS countries FROM ipstat_values WHERE day = ?"
        f"{inner_only} GROUP BY visitor) c ON c.visitor = s.visitor GROUP BY s.subject",
        [*args, day, *(args if subject else [])],
    ):
        s = found[r["subject"]]
        s.max_ips_per_visitor = int(r["ips"])
        s.max_countries_per_visitor = int(r["countries"])
    if scope == "ip":
        ip_only = " AND ip = ?" if subject else ""
        for r in await storage.fetch_all(
            f"SELECT * FROM ipstat_unconsented WHERE day = ?{ip_only}", args
        ):
            s = found[r["ip"]]
            s.unconsented_hits, s.unconsented_bot_hits = r["hits"], r["bot_hits"]
            s.unconsented_crawler_hits = r["crawler_hits"]
            s.unconsented_peak = r["peak_per_minute"]
    return dict(found)


def _day_entry(day: str, s: DayStats, score: int, rules: list[str]) -> dict[str, Any]:
    return {
        "date": day,
        "hits": s.hits,
        "visitors": s.visitors,
        "user_agents": s.user_agents,
        "first_seen": iso(s.first_ms),
        "last_seen": iso(s.last_ms),
        "peak_per_minute": s.peak_per_minute,
        "countries": s.countries,
        "bot_hits": s.bot_hits,
        "no_page_hits": s.no_page_hits,
        "score": score,
        "rules": rules,
        "unconsented": (
            {
                "hits": s.unconsented_hits,
                "bot_hits": s.unconsented_bot_hits,
                "crawler_hits": s.unconsented_crawler_hits,
                "peak_per_minute": s.unconsented_peak,
            }
            if s.unconsented_hits
            else None
        ),
    }


async def lookup(
    storage: Storage,
    geoip: GeoIP,
    fraud: FraudSettings,
    ip_text: str,
    *,
    date: str | None = None,
    days: int = 30,
    cursor: str | None = None,
    limit: int = 50,
    include_blocked: bool = False,
) -> dict[str, Any]:
    """Everything about one IP: geo, score and signals, per-day aggregates, raw hits."""
    ip = parse_ip(ip_text)
    last = date or today()
    first = day_of(int(time.mktime(time.strptime(last, "%Y-%m-%d")) * 1000) - days * DAY_MS)
    found = await storage.fetch_all(
        f"SELECT day FROM ipstat_daily WHERE {by_ip('ipstat_daily')} AND day > ? "
        f"AND day <= ? UNION SELECT day FROM ipstat_unconsented WHERE "
        f"{by_ip('ipstat_unconsented')} AND day > ? AND day <= ? ORDER BY day DESC",
        [ip, first, last, ip, first, last],
    )
    geo = geoip.lookup(ip)
    entries = []
    verdicts = {}
    for row in found:
        stats = (await _stats(storage, row["day"], "ip", ip)).get(ip, DayStats())
        verdict = evaluate(stats, geo, fraud)
        verdicts[row["day"]] = verdict
        entries.append(_day_entry(row["day"], stats, verdict.score, verdict.rules))
    focus = date or (found[0]["day"] if found else last)
    verdict = verdicts.get(focus) or evaluate(DayStats(), geo, fraud)
    return {
        "ip": ip,
        "network": network_of(ip),
        "date": focus,
        "geo": geo_dict(geo),
        "score": verdict.score,
        "signals": [s.as_dict() for s in verdict.signals],
        "crawler": verdict.crawler,
        "days": entries,
        "hits": await raw_hits(storage, ip, cursor, limit, include_blocked),
    }


async def raw_hits(
    storage: Storage, ip: str, cursor: str | None, limit: int, include_blocked: bool
) -> dict[str, Any]:
    """The newest stored hits of ``ip``, ``limit`` at a time (4.1.9 troubleshooting).

    ``hits`` has no IP index (its writes cost too much: ``collector.subject_hours``), so
    the runs of hours in which the address has hits are read newest first, each through
    the time index, until the page is full: a busy address fills it from its last hour.
    """
    before: tuple[int, int] | None = None
    if cursor:
        match = CURSOR.match(cursor)
        if not match:
            raise InputError(f"cursor: {cursor[:40]!r} is not a cursor from a previous page")
        before = (int(match[1]), int(match[2]))
    blocked = f", CASE WHEN {VISIBLE} THEN 0 ELSE 1 END AS blocked" if include_blocked else ""
    visible = "" if include_blocked else f" AND {VISIBLE}"
    rows: list[dict[str, Any]] = []
    for lo, hi in reversed(await subject_hours.ranges(storage, "ip", "?", [ip])):
        where = "ts_ms >= ? AND ts_ms < ? AND ip = ?"
        params: list[Any] = [lo, hi, ip]
        if before is not None:
            if lo > before[0]:
                continue  # the whole run is newer than the page before
            ts, hit_id = before
            where += " AND (ts_ms < ? OR (ts_ms = ? AND id < ?))"
            params += [ts, ts, hit_id]
        rows += await storage.fetch_all(
            f"SELECT {_HIT_FIELDS}{blocked} FROM hits WHERE {where}{visible} "
            "ORDER BY ts_ms DESC, id DESC LIMIT ?",
            [*params, limit + 1 - len(rows)],
        )
        if len(rows) > limit:
            break
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = f"{rows[-1]['ts_ms']}.{rows[-1]['id']}" if more else None
    for r in rows:
        r["ts"] = iso(r["ts_ms"])
        if include_blocked:
            r["blocked"] = bool(r["blocked"])
        del r["id"]
    return {"items": rows, "next_cursor": next_cursor}


async def top(
    storage: Storage,
    geoip: GeoIP,
    fraud: FraudSettings,
    *,
    date: str | None = None,
    kind: Kind = "ip",
    sort: str = "score",
    limit: int = 50,
    min_score: int = 0,
) -> dict[str, Any]:
    """The most suspicious IPs (or networks) of one day."""
    day = date or today()
    scope = "ip" if kind == "ip" else "net"
    items = []
    for subject, stats in (await _stats(storage, day, scope, None)).items():
        where = subject if kind == "ip" else subject.split("/")[0]
        geo = geoip.lookup(where)
        verdict = evaluate(stats, geo, fraud, network=kind == "network")
        if verdict.score < min_score:
            continue
        items.append(
            {
                "ip": subject if kind == "ip" else None,
                "network": network_of(subject) if kind == "ip" else subject,
                "score": verdict.score,
                "rules": verdict.rules,
                "hits": stats.hits + stats.unconsented_hits,
                "visitors": stats.visitors,
                "country": geo.country or (stats.countries[0] if stats.countries else None),
                "asn": geo.asn,
                "as_org": geo.as_org,
                "crawler": verdict.crawler,
            }
        )
    keys = {"score": ("score", "hits"), "hits": ("hits", "score"), "visitors": ("visitors",)}
    if sort not in keys:
        raise InputError(f"sort: must be one of {', '.join(keys)}, got {sort[:20]!r}")

    def order(item: dict[str, Any]) -> tuple[Any, ...]:
        return (*(-int(item[k]) for k in keys[sort]), item["network"], item["ip"] or "")

    items.sort(key=order)
    items = items[:limit]
    return {"date": day, "kind": kind, "items": items, "count": len(items)}


def render_lookup(report: dict[str, Any]) -> str:
    """``collector ip ADDRESS`` as text for a terminal."""
    geo = report["geo"]
    place = ", ".join(str(p) for p in (geo["city"], geo["region"], geo["country"]) if p)
    asn = f"AS{geo['asn']} {geo['as_org'] or ''}".strip() if geo["asn"] else "-"
    lines = [
        f"IP        {report['ip']}  (network {report['network']})",
        f"location  {place or '-'}   ASN {asn}",
        f"score     {report['score']} on {report['date']}"
        + (f"   crawler: {report['crawler']}" if report["crawler"] else ""),
    ]
    for s in report["signals"]:
        lines.append(f"  ! {s['rule']}: {s['explanation']}")
    lines.append("")
    lines.append("DATE        HITS  VISITORS  UAS  PEAK/MIN  BOTS  NOPAGE  SCORE  COUNTRIES")
    for d in report["days"]:
        lines.append(
            f"{d['date']}  {d['hits']:>5} {d['visitors']:>9} {d['user_agents']:>4} "
            f"{d['peak_per_minute']:>9} {d['bot_hits']:>5} {d['no_page_hits']:>7} "
            f"{d['score']:>6}  {' '.join(d['countries']) or '-'}"
        )
    lines.append("")
    lines.append("latest hits:")
    for h in report["hits"]["items"][:20]:
        lines.append(
            f"  {h['ts']}  {h['visitor_id'][:8]}  {h['browser_family']:<16} "
            f"{h['page_url'] or '(no page)'}"
        )
    return "\n".join(lines)


def render_top(report: dict[str, Any]) -> str:
    """``collector ip --top N`` as text for a terminal."""
    head = "IP" if report["kind"] == "ip" else "NETWORK"
    lines = [
        f"{report['date']}: the most suspicious by score",
        f"{head:<40} {'SCORE':>5} {'HITS':>6} {'VISITORS':>8}  COUNTRY  RULES",
    ]
    for i in report["items"]:
        label = i["ip"] or i["network"]
        rules = " ".join(i["rules"]) or (f"crawler: {i['crawler']}" if i["crawler"] else "-")
        lines.append(
            f"{label:<40} {i['score']:>5} {i['hits']:>6} {i['visitors']:>8}  "
            f"{i['country'] or '-':<7}  {rules}"
        )
    return "\n".join(lines)
