"""Breach report (5.4, 5.6): who must be informed when data was disclosed or lost.

Given the affected time window (and optionally an IP range), list every subject whose
hits lay in it — visitor ids with their consent ids, IPs, hit counts and first/last
time — so the store can reach them through their consent records. The admin view:
blocked subjects are included, depersonalised hits (no visitor id) are not, since
nobody can be identified from them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

from collector.errors import InputError
from collector.storage.base import Storage

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_PAGE = 10_000


def parse_time(text: str, name: str) -> int:
    """ISO date or date-time (UTC unless it carries an offset) as unix ms."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"{name}: expected an ISO date or date-time, got {text[:40]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def parse_network(text: str | None) -> Network | None:
    if not text:
        return None
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InputError(f"ip-range: not an IP network (CIDR): {text[:60]!r}") from None


async def affected(
    storage: Storage, from_ms: int, to_ms: int, network: Network | None = None
) -> dict[str, Any]:
    """Subjects with hits in [from_ms, to_ms) (and inside ``network``), one entry each."""
    if to_ms <= from_ms:
        raise InputError("to: must be after from")
    subjects: dict[str, dict[str, Any]] = {}
    in_range: dict[str, bool] = {}
    last_key: tuple[str, str, str] = ("", "", "")
    while True:
        # Keyset pagination keeps memory flat for a large window.
        page = await storage.fetch_all(
            "SELECT visitor_id, consent_id, ip, count(*) AS hits, "
            "min(ts_ms) AS first_ms, max(ts_ms) AS last_ms FROM hits "
            "WHERE ts_ms >= ? AND ts_ms < ? AND visitor_id <> '' "
            "GROUP BY visitor_id, consent_id, ip "
            "HAVING (visitor_id > ?) OR (visitor_id = ? AND consent_id > ?) "
            "OR (visitor_id = ? AND consent_id = ? AND ip > ?) "
            "ORDER BY visitor_id, consent_id, ip LIMIT ?",
            [from_ms, to_ms, last_key[0], *last_key[:2], *last_key, _PAGE],
        )
        for row in page:
            ip = row["ip"]
            if network is not None:
                inside = in_range.get(ip)
                if inside is None:
                    inside = in_range[ip] = _inside(ip, network)
                if not inside:
                    continue
            entry = subjects.setdefault(
                row["visitor_id"],
                {
                    "visitor_id": row["visitor_id"],
                    "consent_ids": [],
                    "ips": [],
                    "hits": 0,
                    "first_ms": row["first_ms"],
                    "last_ms": row["last_ms"],
                },
            )
            if row["consent_id"] and row["consent_id"] not in entry["consent_ids"]:
                entry["consent_ids"].append(row["consent_id"])
            if ip not in entry["ips"]:
                entry["ips"].append(ip)
            entry["hits"] += row["hits"]
            entry["first_ms"] = min(entry["first_ms"], row["first_ms"])
            entry["last_ms"] = max(entry["last_ms"], row["last_ms"])
        if len(page) < _PAGE:
            break
        last = page[-1]
        last_key = (last["visitor_id"], last["consent_id"], last["ip"])
    items = sorted(subjects.values(), key=lambda e: e["visitor_id"])
    consent_ids = sorted({c for e in items for c in e["consent_ids"]})
    return {
        "from_ms": from_ms,
        "to_ms": to_ms,
        "ip_range": str(network) if network else None,
        "subjects": items,
        "visitors": len(items),
        "consent_ids": consent_ids,
        "hits": sum(e["hits"] for e in items),
    }


def _inside(ip: str, network: Network) -> bool:
    try:
        return ipaddress.ip_address(ip) in network
    except ValueError:
        return False
