"""Retention (5.1): processing lasts for the period stated in the consent.

Raw hits older than ``retention.days`` (default: ``consent.period_days``) are deleted,
or depersonalised when ``retention.mode = "depersonalise"``: the IP is cut to its /24
(IPv4) or /48 (IPv6) network, and visitor, session and consent ids, the raw user agent
and allowlisted cookies are dropped, leaving page, time, parsed browser/OS/device and
coarse geo. Rollups and ``pixel_counts`` are never touched.

Work goes in chunks of ``retention.chunk_size`` rows, each its own short transaction,
so the batch writer waits at most one chunk. A backend that can drop whole time
partitions (PostgreSQL) provides ``drop_partitions_before(ts_ms)``; it is called first,
and the chunked delete handles what is left. Per-IP statistics of the expired days go
too, and last, once their hits are gone, the ``visitor_hours`` and ``ip_hours`` rows of
the hours before the cutoff.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from collector import ipstats, rollups, subject_hours
from collector.config import Settings
from collector.storage.base import Storage

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
# A depersonalised hit has no visitor id; this also marks it as done.
_PENDING = {"delete": "", "depersonalise": " AND visitor_id <> ''"}


@runtime_checkable
class PartitionDropper(Protocol):
    """Optional storage capability (PostgreSQL): drop the daily partitions of hits that
    lie entirely before ``ts_ms``; returns how many partitions went."""

    async def drop_partitions_before(self, ts_ms: int) -> int: ...


@dataclass(frozen=True, slots=True)
class Plan:
    cutoff_ms: int
    days: int
    mode: str
    pending: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff_ms": self.cutoff_ms,
            "days": self.days,
            "mode": self.mode,
            "pending": self.pending,
        }


def retention_days(settings: Settings) -> int:
    return settings.retention.days or settings.consent.period_days


async def plan(
    storage: Storage, settings: Settings, now_ms: int | None = None, days: int | None = None
) -> Plan:
    """What a purge would do now: the cutoff and how many hits it touches."""
    days = days or retention_days(settings)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now_ms - days * DAY_MS
    mode = settings.retention.mode
    row = await storage.fetch_one(
        f"SELECT count(*) AS n FROM hits WHERE ts_ms < ?{_PENDING[mode]}", [cutoff]
    )
    return Plan(cutoff, days, mode, int(row["n"]) if row else 0)


def truncate_ip(ip: str) -> str:
    """The network address of the /24 (IPv4) or /48 (IPv6) the address lies in."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "0.0.0.0"
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)


async def purge(
    storage: Storage,
    p: Plan,
    chunk_size: int,
    progress: Callable[[int], None] = lambda n: None,
    pause_s: float = 0.005,
) -> int:
    """Apply ``p``; call ``progress(rows)`` after each chunk; return rows handled."""
    done = 0
    if p.mode == "delete" and isinstance(storage, PartitionDropper):
        if await storage.drop_partitions_before(p.cutoff_ms):
            left = await storage.fetch_one(
                "SELECT count(*) AS n FROM hits WHERE ts_ms < ?", [p.cutoff_ms]
            )
            done = p.pending - int(left["n"] if left else 0)
            progress(done)
    # Per-IP statistics are personal data with the same period as the hits (3.3.2, 5.1).
    async with storage.transaction() as tx:
        await ipstats.purge(tx, p.cutoff_ms)
        # Rollups outlive the raw hits (5.1): from now on no rebuild may recompute the
        # days being purged or depersonalised, or it would erase their counts.
        await rollups.mark_purged(tx, p.cutoff_ms)
    while True:
        if p.mode == "delete":
            async with storage.transaction() as tx:
                n = await tx.execute(
                    "DELETE FROM hits WHERE id IN "
                    "(SELECT id FROM hits WHERE ts_ms < ? ORDER BY ts_ms LIMIT ?)",
                    [p.cutoff_ms, chunk_size],
                )
                await subject_hours.hits_deleted(tx)
        else:
            n = await _depersonalise_chunk(storage, p.cutoff_ms, chunk_size)
        done += n
        if n:
            progress(n)
        if n < chunk_size:
            # Only now: until its hits are gone, an hour must still lead erasure to them.
            await subject_hours.purge(storage, p.cutoff_ms)
            await storage.settle_deletes()  # no copy of the expired rows left in the files
            return done
        await asyncio.sleep(pause_s)  # let the batch writer in between chunks


async def _depersonalise_chunk(storage: Storage, cutoff_ms: int, chunk_size: int) -> int:
    async with storage.transaction() as tx:
        rows = await tx.fetch_all(
            "SELECT id, ip FROM hits WHERE ts_ms < ? AND visitor_id <> '' ORDER BY ts_ms LIMIT ?",
            [cutoff_ms, chunk_size],
        )
        await tx.executemany(
            "UPDATE hits SET ip = ?, visitor_id = '', session_id = '', consent_id = '', "
            "user_agent = '', cookies = NULL WHERE id = ?",
            [(truncate_ip(r["ip"]), r["id"]) for r in rows],
        )
    return len(rows)


# --- Proofs of consent ---------------------------------------------------------------------
# Kept apart from the hits above: a consent record proves the lawfulness of the hits recorded
# under it, so it lives longer than they do (consent.records_retention_days).


@dataclass(frozen=True, slots=True)
class ConsentPlan:
    cutoff_ms: int
    days: int
    pending: int

    def as_dict(self) -> dict[str, Any]:
        return {"cutoff_ms": self.cutoff_ms, "days": self.days, "pending": self.pending}


def consent_records_days(settings: Settings) -> int:
    """How long a proof of consent is kept: the configured period, or else the consent
    period plus the hits' retention, so that it outlives every hit recorded under it (the
    last one can be recorded ``period_days`` after the decision and is kept
    ``retention_days`` more)."""
    configured = settings.consent.records_retention_days
    return configured or settings.consent.period_days + retention_days(settings)


async def consent_records_plan(
    storage: Storage, settings: Settings, now_ms: int | None = None
) -> ConsentPlan:
    """What a consent-record purge would do now: the cutoff and how many records go."""
    days = consent_records_days(settings)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now_ms - days * DAY_MS
    row = await storage.fetch_one(
        "SELECT count(*) AS n FROM consent_records WHERE decided_at_ms < ?", [cutoff]
    )
    return ConsentPlan(cutoff, days, int(row["n"]) if row else 0)


async def purge_consent_records(
    storage: Storage,
    p: ConsentPlan,
    chunk_size: int,
    actor: str,
    pause_s: float = 0.005,
) -> int:
    """Delete the consent records decided before ``p.cutoff_ms``; the number deleted.

    The purge is first registered in ``consent_record_purges`` (append-only): the database
    refuses to delete a consent record younger than the newest registered cutoff, and an
    edit of any record whatever its age. Deletes go in short chunks like the hits'.
    """
    if not p.pending:
        return 0
    await storage.execute(
        "INSERT INTO consent_record_purges (cutoff_ms, days, pending, actor) VALUES (?, ?, ?, ?)",
        [p.cutoff_ms, p.days, p.pending, actor[:128]],
    )
    done = 0
    while True:
        n = await storage.execute(
            "DELETE FROM consent_records WHERE id IN (SELECT id FROM consent_records "
            "WHERE decided_at_ms < ? ORDER BY decided_at_ms LIMIT ?)",
            [p.cutoff_ms, chunk_size],
        )
        done += n
        if n < chunk_size:
            return done
        await asyncio.sleep(pause_s)
