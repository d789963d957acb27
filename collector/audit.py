"""The audit trail (5.5): every action on personal data, append-only and hash-chained.

Each record carries the HMAC of its own fields and of the previous record's hash, keyed
with a key derived from the consent secret (which never sits in the database). Editing,
deleting or reordering any record breaks the chain from that point, and someone with
write access to the database alone cannot forge a new chain. ``verify`` walks it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from collector.storage.base import Storage

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
_FIELDS = ("ts_ms", "actor", "role", "action", "subject", "request_id", "outcome", "detail")


def audit_key(secret: str) -> bytes:
    return hmac.new(secret.encode("utf-8"), b"collector audit chain v1", hashlib.sha256).digest()


def _digest(key: bytes, record: dict[str, Any], prev_hash: str) -> str:
    payload = json.dumps(
        [record.get(f) for f in _FIELDS] + [prev_hash], separators=(",", ":"), ensure_ascii=True
    )
    return hmac.new(key, payload.encode("ascii"), hashlib.sha256).hexdigest()


class AuditLog:
    def __init__(self, storage: Storage, secret: str) -> None:
        self.storage = storage
        self._key = audit_key(secret)

    async def record(
        self,
        *,
        actor: str,
        action: str,
        outcome: str = "ok",
        role: str | None = None,
        subject: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        entry: dict[str, Any] = {
            "ts_ms": int(time.time() * 1000),
            "actor": actor[:128],
            "role": role,
            "action": action,
            "subject": subject[:256] if subject else subject,
            "request_id": request_id,
            "outcome": outcome,
            "detail": json.dumps(detail, sort_keys=True, default=str) if detail else None,
        }
        async with self.storage.transaction() as tx:
            last = await tx.fetch_one("SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1")
            prev = last["hash"] if last else GENESIS
            digest = _digest(self._key, entry, prev)
            await tx.execute(
                "INSERT INTO audit_log (ts_ms, actor, role, action, subject, request_id, "
                "outcome, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [*(entry[f] for f in _FIELDS), prev, digest],
            )

    async def entries(
        self,
        *,
        limit: int = 100,
        before_id: int | None = None,
        action: str | None = None,
        subject: str | None = None,
    ) -> list[dict[str, Any]]:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        if action:
            where.append("action = ?")
            params.append(action)
        if subject:
            where.append("subject = ?")
            params.append(subject)
        return await self.storage.fetch_all(
            f"SELECT * FROM audit_log WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )

    async def verify(self) -> VerifyResult:
        """Walk the whole chain in id order; the first record that does not fit fails it."""
        prev = GENESIS
        checked = 0
        last_id = 0
        while True:
            page = await self.storage.fetch_all(
                "SELECT * FROM audit_log WHERE id > ? ORDER BY id LIMIT 5000", [last_id]
            )
            if not page:
                return VerifyResult(True, checked, None, "")
            for row in page:
                if row["prev_hash"] != prev:
                    return VerifyResult(
                        False, checked, row["id"], "previous-hash link broken (row removed?)"
                    )
                if not hmac.compare_digest(_digest(self._key, row, prev), row["hash"]):
                    return VerifyResult(False, checked, row["id"], "record altered")
                prev = row["hash"]
                checked += 1
                last_id = row["id"]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    checked: int
    bad_id: int | None
    reason: str
