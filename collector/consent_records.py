"""Proof of consent: every decision stored as an append-only record (2.1, 4.1.10-4.1.11, 9.1-9.2).

A record says who decided what, under which policy version, when and how -- without
holding the person's IP or user agent: the IP is kept only as a keyed hash (an auditor who
is told an IP can check it against a record; nobody can read IPs out of the table) and the
user agent only as its browser family. Each decision has its own consent id; ``previous_id``
chains a browser's decisions, and ``chain`` follows those links both ways.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict, dataclass
from typing import Any, Literal

from collector.storage.base import Storage

Action = Literal["grant", "refuse", "withdraw"]
_COLUMNS = (
    "consent_id",
    "previous_id",
    "action",
    "statistics",
    "advertising",
    "policy_version",
    "decided_at_ms",
    "source",
    "origin",
    "user_agent_family",
    "ip_hash",
    "gpc",
)
_INSERT = (
    f"INSERT INTO consent_records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_MAX_CHAIN = 1000


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    consent_id: str
    previous_id: str | None
    action: Action
    statistics: bool
    advertising: bool
    policy_version: str
    decided_at_ms: int
    source: str
    origin: str | None
    user_agent_family: str
    ip_hash: str
    gpc: bool


class ConsentRecords:
    """Append and read consent records through the storage's generic access."""

    def __init__(self, storage: Storage, pepper: bytes) -> None:
        self.storage = storage
        self._pepper = pepper

    def ip_hash(self, ip: str) -> str:
        """HMAC-SHA256 of the IP under the pepper: comparable, not reversible without the key.

        A plain hash of an IPv4 address is reversed by trying all 2^32 of them; the key
        (kept outside the database) is what makes this pseudonymous rather than cosmetic.
        """
        return hmac.new(self._pepper, ip.encode("ascii", "replace"), hashlib.sha256).hexdigest()

    async def append(self, record: ConsentRecord) -> None:
        values = asdict(record)
        for flag in ("statistics", "advertising", "gpc"):
            values[flag] = int(values[flag])
        await self.storage.execute(_INSERT, [values[c] for c in _COLUMNS])

    async def chain(self, consent_id: str) -> list[dict[str, Any]]:
        """Every record linked to ``consent_id`` (earlier and later decisions), oldest first."""
        known: set[str] = {consent_id}
        frontier = [consent_id]
        found: dict[int, dict[str, Any]] = {}
        while frontier and len(found) < _MAX_CHAIN:
            marks = ", ".join("?" * len(frontier))
            rows = await self.storage.fetch_all(
                f"SELECT id, {', '.join(_COLUMNS)} FROM consent_records "
                f"WHERE consent_id IN ({marks}) OR previous_id IN ({marks})",
                [*frontier, *frontier],
            )
            frontier = []
            for row in rows:
                found.setdefault(row["id"], row)
                for key in ("consent_id", "previous_id"):
                    linked = row[key]
                    if linked and linked not in known:
                        known.add(linked)
                        frontier.append(linked)
        return [_public(found[k]) for k in sorted(found)]


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = {c: row[c] for c in _COLUMNS}
    for flag in ("statistics", "advertising", "gpc"):
        out[flag] = bool(out[flag])
    return out
