"""Blocking (6.2.4): from the moment of the request, for the period of the check.

A block names a visitor id, an IP address or an IP network (CIDR), and may carry an end
(``expires_at``): the period of the check, after which it stops applying by itself
(parsed and validated in ``block_targets``).

Two halves. ``add``/``release``/``expire_due`` write the ``blocks`` table and rebuild the
rollups for the span of the subject's hits, so existing data drops out of (or returns
to) every aggregate at once; views hide it through ``collector.visibility.VISIBLE``. A
network block stores the addresses inside it that have hits (``block_ips``), so that
VISIBLE stays portable exact-match SQL. ``BlockList`` keeps the blocks in force in
memory, refreshed every ``refresh_s`` by each server process, and is a ``BatchWriter``
filter: a hit of a blocked subject is dropped at write time, including hits already
queued, so a block made anywhere (CLI, another worker) stops recording within
``refresh_s``; an end is applied by the filter to the millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from collector import subject_hours
from collector.aggregates import Rebuilder
from collector.audit import AuditLog
from collector.block_targets import (
    MIN_PREFIX,
    Network,
    Target,
    parse_duration,
    parse_expiry,
    parse_network,
)
from collector.errors import Conflict, InputError, NotFound, StorageError, Unprocessable
from collector.storage.base import HitRow, Storage, Transaction
from collector.subjects import Subject, rebuild, span_of

__all__ = [
    "MIN_PREFIX",
    "BlockList",
    "Target",
    "add",
    "expire_due",
    "find_active",
    "listing",
    "parse_duration",
    "parse_expiry",
    "parse_network",
    "release",
    "settle",
    "state",
]

logger = logging.getLogger(__name__)

EXPIRY_ACTOR = "expiry"
# Blocks not released, whatever their end: the filter drops the ended ones itself.
_UNRELEASED = "SELECT id, kind, value, expires_at FROM blocks WHERE released_at IS NULL"


def _now_ms() -> int:
    return int(time.time() * 1000)


def state(row: dict[str, Any], now_ms: int | None = None) -> str:
    """``active``, ``expired`` (its end came before any release) or ``released``."""
    now = _now_ms() if now_ms is None else now_ms
    end, released = row.get("expires_at"), row.get("released_at")
    if end is not None and end <= (released if released is not None else now):
        return "expired"
    return "released" if released is not None else "active"


def _shown(row: dict[str, Any], now_ms: int) -> dict[str, Any]:
    return {**row, "state": state(row, now_ms)}


class BlockList:
    """The blocks in force, in memory; a writer filter that drops blocked subjects' hits."""

    def __init__(
        self,
        storage: Storage,
        refresh_s: float = 0.25,
        on_drop: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.storage = storage
        self.refresh_s = refresh_s
        self.on_drop = on_drop
        # Called (from the refresh loop) when a block's end has passed and it is not yet
        # marked released: the server then releases it, audited (``expire_due``).
        self.on_expired: Callable[[], None] | None = None
        self.visitors: frozenset[str] = frozenset()
        self.ips: frozenset[str] = frozenset()
        # Per IP version: (prefix length, the network numbers at that length).
        self.networks: dict[int, list[tuple[int, frozenset[int]]]] = {4: [], 6: []}
        self._rows: list[dict[str, Any]] = []
        self._next_end = math.inf
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        self._rows = await self.storage.fetch_all(_UNRELEASED)
        ended = self._apply(_now_ms())
        if ended and self.on_expired is not None:
            self.on_expired()

    def _apply(self, now: int) -> bool:
        """Rebuild the sets from the unreleased rows as of ``now``; True if any ended."""
        live = [r for r in self._rows if r["expires_at"] is None or r["expires_at"] > now]
        self.visitors = frozenset(r["value"] for r in live if r["kind"] == "visitor")
        self.ips = frozenset(r["value"] for r in live if r["kind"] == "ip")
        by_length: dict[tuple[int, int], set[int]] = {}
        for r in live:
            if r["kind"] == "network":
                net = ipaddress.ip_network(r["value"])
                key = (net.version, net.prefixlen)
                by_length.setdefault(key, set()).add(
                    int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
                )
        self.networks = {
            v: sorted((p, frozenset(s)) for (ver, p), s in by_length.items() if ver == v)
            for v in (4, 6)
        }
        ends = [r["expires_at"] for r in live if r["expires_at"] is not None]
        self._next_end = min(ends, default=math.inf)
        return len(live) != len(self._rows)

    def blocks_ip(self, ip: str) -> bool:
        """Is ``ip`` (canonical text, as hits store it) inside a blocked network?"""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        number, bits = int(addr), addr.max_prefixlen
        return any(number >> (bits - p) in nets for p, nets in self.networks[addr.version])

    def keep(self, rows: Sequence[HitRow]) -> Sequence[HitRow]:
        if self._next_end != math.inf and _now_ms() >= self._next_end:
            self._apply(_now_ms())  # an end passed since the last refresh
        visitors, ips = self.visitors, self.ips
        networks = bool(self.networks[4] or self.networks[6])
        if not visitors and not ips and not networks:
            return rows
        kept = [
            r
            for r in rows
            if r.visitor_id not in visitors
            and r.ip not in ips
            and not (networks and self.blocks_ip(r.ip))
        ]
        if len(kept) != len(rows):
            self.on_drop(len(rows) - len(kept))
        return kept

    async def start(self) -> None:
        if self._task is None:
            await self.refresh()
            self._task = asyncio.create_task(self._run(), name="collector-blocklist")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except StorageError as exc:
                # Keep enforcing the last known blocks; say so once per outage.
                if not failing:
                    logger.error("cannot refresh blocks, keeping the last known set: %s", exc)
                failing = True
            else:
                failing = False


def _like_prefix(net: Network) -> str:
    """A LIKE pattern that every canonical address of ``net`` matches (a coarse first cut
    that both backends evaluate; the exact test is done in Python)."""
    if isinstance(net, ipaddress.IPv4Network):
        octets = str(net.network_address).split(".")[: net.prefixlen // 8]
        return ".".join(octets) + ("." if octets else "") + "%"
    first = int(net.network_address) >> 112
    if net.prefixlen >= 16 and first:
        return f"{first:x}:%"
    return "%:%"


async def _add_members(tx: Transaction, block_id: int, net: Network) -> int:
    """Record the stored addresses inside ``net`` for VISIBLE; the number added."""
    # ip_hours holds every address with hits (hits has no IP index), a row per hour,
    # once the hits above the mark are noted.
    await subject_hours.catch_up(tx)
    found = await tx.fetch_all(
        "SELECT DISTINCT ip FROM ip_hours WHERE ip LIKE ?", [_like_prefix(net)]
    )
    have = {
        r["ip"]
        for r in await tx.fetch_all("SELECT ip FROM block_ips WHERE block_id = ?", [block_id])
    }
    new = []
    for row in found:
        ip = row["ip"]
        with contextlib.suppress(ValueError):
            if ip not in have and ipaddress.ip_address(ip) in net:
                new.append((block_id, ip))
    if new:
        await tx.executemany("INSERT INTO block_ips (block_id, ip) VALUES (?, ?)", new)
    return len(new)


async def _span(
    tx: Transaction, kind: str, value: str, block_id: int, since_ms: int | None = None
) -> tuple[int, int] | None:
    """[first, last + 1) of the blocked subject's hits (since ``since_ms``), or None."""
    scopes: list[tuple[str, list[Any]]]
    if kind == "network":
        members = "SELECT ip FROM block_ips WHERE block_id = ?"
        scopes = await subject_hours.where_in(tx, "ip", members, [block_id])
    else:
        scopes = await subject_hours.where(tx, "visitor" if kind == "visitor" else "ip", value)
    if since_ms is not None:
        scopes = [(f"{where} AND ts_ms >= ?", [*params, since_ms]) for where, params in scopes]
    return await span_of(tx, scopes)


async def add(
    storage: Storage,
    target: Target | Subject,
    reason: str,
    actor: str,
    rebuilders: Sequence[Rebuilder],
    *,
    expires_at: int | None = None,
) -> dict[str, Any]:
    """Block ``target``: record it and take its hits out of the rollups (one transaction)."""
    reason = reason.strip()
    if not reason:
        raise InputError("reason: say why the data is blocked (the request or the check)")
    now = _now_ms()
    if expires_at is not None and expires_at <= now:
        raise Unprocessable("expires_at: must be in the future")
    async with storage.transaction() as tx:
        if await tx.fetch_one(
            "SELECT id FROM active_blocks WHERE kind = ? AND value = ?",
            [target.kind, target.value],
        ):
            raise Conflict(f"{target.kind} {target.value} is blocked already")
        await tx.execute(
            "INSERT INTO blocks (kind, value, reason, created_at, created_by, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [target.kind, target.value, reason[:500], now, actor, expires_at],
        )
        row = await tx.fetch_one(
            "SELECT * FROM blocks WHERE kind = ? AND value = ? AND released_at IS NULL "
            "ORDER BY id DESC LIMIT 1",
            [target.kind, target.value],
        )
        assert row is not None
        if target.kind == "network":
            await _add_members(tx, int(row["id"]), ipaddress.ip_network(target.value))
        when = await _span(tx, target.kind, target.value, int(row["id"]))
        if when is not None:
            await rebuild(tx, rebuilders, when)
    return {**_shown(row, now), "span_ms": list(when) if when else None}


async def _end(
    tx: Transaction,
    row: dict[str, Any],
    at_ms: int,
    actor: str,
    rebuilders: Sequence[Rebuilder],
) -> bool:
    """Mark ``row`` released at ``at_ms`` unless someone did first; its hits count again."""
    done = await tx.execute(
        "UPDATE blocks SET released_at = ?, released_by = ? WHERE id = ? AND released_at IS NULL",
        [at_ms, actor, row["id"]],
    )
    if not done:
        return False
    when = await _span(tx, row["kind"], row["value"], int(row["id"]))
    # The addresses were only needed while the block was in force (personal data).
    await tx.execute("DELETE FROM block_ips WHERE block_id = ?", [row["id"]])
    if when is not None:
        await rebuild(tx, rebuilders, when)
    return True


async def release(
    storage: Storage, block_id: int, actor: str, rebuilders: Sequence[Rebuilder]
) -> dict[str, Any]:
    """Unblock: the subject's hits count again, and new hits are recorded again."""
    now = _now_ms()
    async with storage.transaction() as tx:
        row = await tx.fetch_one("SELECT * FROM blocks WHERE id = ?", [block_id])
        if row is None or row["released_at"] is not None:
            raise NotFound(f"no active block with id {block_id}")
        if state(row, now) == "expired":
            raise NotFound(f"no active block with id {block_id}: it has expired")
        if not await _end(tx, row, now, actor, rebuilders):
            raise NotFound(f"no active block with id {block_id}")
    return _shown({**row, "released_at": now, "released_by": actor}, now)


async def expire_due(
    storage: Storage, rebuilders: Sequence[Rebuilder], audit: AuditLog
) -> list[dict[str, Any]]:
    """Release every block whose end has passed, as of that end, and audit each one.

    The end already took effect (VISIBLE and the writer filter compare it with the
    clock); this makes it a release like any other: ``released_at = expires_at`` by
    ``expiry``, the rollups rebuilt with the subject's hits counted again, the stored
    network addresses deleted, one ``block.expire`` audit record. Safe to run in every
    process at once: each block is released by exactly one of them.
    """
    now = _now_ms()
    due = await storage.fetch_all(
        "SELECT * FROM blocks WHERE released_at IS NULL AND expires_at IS NOT NULL "
        "AND expires_at <= ? ORDER BY id",
        [now],
    )
    ended = []
    for row in due:
        async with storage.transaction() as tx:
            won = await _end(tx, row, int(row["expires_at"]), EXPIRY_ACTOR, rebuilders)
        if not won:
            continue
        shown = _shown({**row, "released_at": row["expires_at"], "released_by": EXPIRY_ACTOR}, now)
        await audit.record(
            actor="system",
            action="block.expire",
            subject=row["value"],
            detail={"kind": row["kind"], "block_id": row["id"], "expires_at": row["expires_at"]},
        )
        logger.info("block %s on %s %s expired", row["id"], row["kind"], row["value"])
        ended.append(shown)
    return ended


async def find_active(storage: Storage, target: Target | Subject) -> int:
    """The id of the block in force on ``target`` (for ``collector unblock --visitor``)."""
    row = await storage.fetch_one(
        "SELECT id FROM active_blocks WHERE kind = ? AND value = ?",
        [target.kind, target.value],
    )
    if row is None:
        raise NotFound(f"{target.kind} {target.value} is not blocked")
    return int(row["id"])


async def listing(storage: Storage, *, active_only: bool = True) -> list[dict[str, Any]]:
    """Blocks, newest first, each with its ``state``; only those in force by default."""
    table = "active_blocks" if active_only else "blocks"
    now = _now_ms()
    rows = await storage.fetch_all(f"SELECT * FROM {table} ORDER BY id DESC")
    return [_shown(r, now) for r in rows]


async def settle(
    storage: Storage,
    target: Target | Subject,
    since_ms: int,
    wait_s: float,
    rebuilders: Sequence[Rebuilder],
    block_id: int | None = None,
) -> None:
    """Close the race of a block made while other processes had not yet refreshed.

    For up to one refresh period after a block, a server that has not yet seen it may
    still store a hit of the subject (hidden by VISIBLE, but added to a rollup by the
    in-batch aggregators; for a network, from an address not yet recorded in
    ``block_ips``). After ``wait_s`` every process has refreshed, so recording those
    addresses and rebuilding the span of the hits stored since the block makes the
    views and rollups exact again.
    """
    net = target.network if isinstance(target, Target) else None
    if not rebuilders and net is None:
        return
    await asyncio.sleep(wait_s)
    async with storage.transaction() as tx:
        if net is not None and block_id is not None:
            if await tx.fetch_one(
                "SELECT id FROM blocks WHERE id = ? AND released_at IS NULL", [block_id]
            ):
                await _add_members(tx, block_id, net)
        when = await _span(tx, target.kind, target.value, block_id or 0, since_ms - 60_000)
        if when is not None:
            await rebuild(tx, rebuilders, when)
