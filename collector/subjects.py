"""Data subjects and what we hold about them: export and erasure on request.

A subject is a visitor id (our first-party cookie) or an IP address (both personal data,
1.1.2). ``export`` gathers every row that names the subject as JSON; ``erase`` deletes
hits and per-IP rows and pseudonymises consent records and released blocks — the proof
that consent was given stays, the link to the person goes — then rebuilds the rollups for
the span the deleted hits covered, all in one transaction. The audit trail keeps naming
the subject: it is the legal record of the processing (5.5) and append-only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from collector import ipstats, rewrites, subject_hours
from collector.aggregates import Rebuilder
from collector.enrich import normalize_ip
from collector.errors import InputError, StorageError
from collector.storage.base import Storage, Transaction

Kind = Literal["visitor", "ip"]
_VISITOR = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_IN_CHUNK = 500
# Columns of a consent record that identify a person; pseudonymised on erasure.
_IDENTIFYING = ("visitor_id", "ip", "ip_address", "user_agent", "ua")


@dataclass(frozen=True, slots=True)
class Subject:
    kind: Kind
    value: str

    @classmethod
    def parse(cls, visitor: str | None, ip: str | None) -> Subject:
        """Exactly one of ``visitor`` or ``ip``, validated; InputError naming the problem."""
        if bool(visitor) == bool(ip):
            raise InputError("name exactly one subject: a visitor id or an IP address")
        if visitor:
            if not _VISITOR.match(visitor):
                raise InputError(f"visitor: not a visitor id: {visitor[:40]!r}")
            return cls("visitor", visitor)
        assert ip is not None
        normal = normalize_ip(ip)
        if normal is None:
            raise InputError(f"ip: not an IP address: {ip[:40]!r}")
        return cls("ip", normal)

    @property
    def column(self) -> str:
        return "visitor_id" if self.kind == "visitor" else "ip"

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "value": self.value}


@dataclass(frozen=True, slots=True)
class PersonalTable:
    """A table besides ``hits`` holding rows about a subject (e.g. per-IP statistics)."""

    name: str
    ip_column: str | None = None
    visitor_column: str | None = None

    def column_for(self, subject: Subject) -> str | None:
        return self.ip_column if subject.kind == "ip" else self.visitor_column

    def where(self, subject: Subject) -> str | None:
        """The clause (one ``?``: the subject's value) selecting its rows, or None."""
        column = self.column_for(subject)
        if column is None:
            return None
        if subject.kind == "ip" and self.name in ipstats.DAY_KEYED:
            return ipstats.by_ip(self.name)  # keyed by (day, ip): a seek per day
        if self.name == "visitor_hours":
            return subject_hours.rows_of("visitor")  # keyed by (hour, visitor): a seek per hour
        return f"{column} = ?"


def personal_tables() -> list[PersonalTable]:
    """Tables that export and erasure cover besides hits; features add theirs here.

    Tables that do not exist (yet) in the database are skipped.
    """
    return [
        # IP statistics (3.3.2): rows named by an IP or a visitor id.
        PersonalTable("ipstat_daily", ip_column="ip"),
        PersonalTable("ipstat_values", ip_column="ip", visitor_column="visitor"),
        PersonalTable("ipstat_minute", ip_column="ip"),
        PersonalTable("ipstat_unconsented", ip_column="ip"),
        PersonalTable("ipstat_unconsented_minute", ip_column="ip"),
        # Addresses with hits inside a network block in force (6.2.4): an erased IP's hits
        # are gone, and the writer filter keeps blocking the network without the row.
        PersonalTable("block_ips", ip_column="ip"),
        # App collection: an app instance id is the app's visitor id.
        PersonalTable("collect_dedupe", visitor_column="instance_id"),
        # The hours in which a visitor id or an IP has hits: how its hits are found
        # (hits has no index on either: collector.subject_hours).
        PersonalTable("visitor_hours", visitor_column="visitor_id"),
        PersonalTable("ip_hours", ip_column="ip"),
    ]


IpHash = Callable[[str], str]
_DELETE_CHUNK = 500  # hits per page of an erasure (one DELETE by id each)


async def table_columns(storage: Storage, table: str) -> list[str] | None:
    """The columns of ``table`` if it exists and has a row, [] if empty, None if absent.

    Portable across backends: reading one row tells both existence and column names.
    """
    try:
        found = await storage.fetch_all(f"SELECT * FROM {table} LIMIT 1")
    except StorageError:
        return None
    return list(found[0]) if found else []


async def hits_where(db: Transaction | Storage, subject: Subject) -> list[tuple[str, list[Any]]]:
    """WHERE clauses over ``hits`` that together select the subject's hits, in time order.

    One clause per run of hours in which the visitor id or IP has hits
    (``collector.subject_hours``: hits has no index on either).
    """
    return await subject_hours.where(db, subject.kind, subject.value)


async def span_of(
    tx: Transaction | Storage, scopes: Sequence[tuple[str, Sequence[Any]]]
) -> tuple[int, int] | None:
    """[first, last + 1) of the hits the WHERE clauses ``scopes`` select, or None."""
    lo: int | None = None
    hi: int | None = None
    for clause, params in scopes:
        row = await tx.fetch_one(
            f"SELECT min(ts_ms) AS lo, max(ts_ms) AS hi FROM hits WHERE {clause}", params
        )
        if row and row["lo"] is not None:
            lo = int(row["lo"]) if lo is None else min(lo, int(row["lo"]))
            hi = int(row["hi"]) if hi is None else max(hi, int(row["hi"]))
    if lo is None or hi is None:
        return None
    return lo, hi + 1


async def rebuild(tx: Transaction, rebuilders: Sequence[Rebuilder], when: tuple[int, int]) -> None:
    for rebuilder in rebuilders:
        await rebuilder(tx, when[0], when[1])


async def export(
    storage: Storage, subject: Subject, ip_hash: IpHash | None = None
) -> dict[str, Any]:
    """Everything held about ``subject`` (admin view: blocked rows included).

    ``ip_hash`` is the consent records' keyed IP hash, to find an IP's consent records.
    """
    hits = []
    for clause, params in await hits_where(storage, subject):
        hits += await storage.fetch_all(
            f"SELECT * FROM hits WHERE {clause} ORDER BY ts_ms, id", params
        )
    consent_ids = sorted({h["consent_id"] for h in hits if h["consent_id"]})
    out: dict[str, Any] = {
        "subject": subject.as_dict(),
        "generated_at_ms": int(time.time() * 1000),
        "hits": hits,
        "blocks": await storage.fetch_all(
            "SELECT * FROM blocks WHERE kind = ? AND value = ? ORDER BY id",
            [subject.kind, subject.value],
        ),
        "consent_records": await _consent_records(
            storage,
            await table_columns(storage, "consent_records"),
            subject,
            consent_ids,
            ip_hash,
        ),
        # Who processed the subject's data, and how (5.5): part of what they may ask for.
        "audit": await storage.fetch_all(
            "SELECT id, ts_ms, actor, role, action, outcome FROM audit_log "
            "WHERE subject = ? ORDER BY id",
            [subject.value],
        ),
    }
    for table in personal_tables():
        rows_of = table.where(subject)
        if rows_of and await table_columns(storage, table.name) is not None:
            out[table.name] = await storage.fetch_all(
                f"SELECT * FROM {table.name} WHERE {rows_of}", [subject.value]
            )
    return out


async def _consent_records(
    db: Storage | Transaction,
    columns: list[str] | None,
    subject: Subject,
    consent_ids: Sequence[str],
    ip_hash: IpHash | None = None,
) -> list[dict[str, Any]]:
    """Consent records (the consent feature's table) given under the subject's consent ids
    or naming the subject directly; ``columns`` from ``table_columns`` (None: no table)."""
    if not columns:
        return []
    found: dict[Any, dict[str, Any]] = {}
    if "consent_id" in columns:
        for start in range(0, len(consent_ids), _IN_CHUNK):
            chunk = list(consent_ids[start : start + _IN_CHUNK])
            marks = ", ".join("?" * len(chunk))
            for row in await db.fetch_all(
                f"SELECT * FROM consent_records WHERE consent_id IN ({marks})", chunk
            ):
                found[_key(row)] = row
    if subject.column in columns:
        for row in await db.fetch_all(
            f"SELECT * FROM consent_records WHERE {subject.column} = ?", [subject.value]
        ):
            found[_key(row)] = row
    if subject.kind == "ip" and ip_hash is not None and "ip_hash" in columns:
        for row in await db.fetch_all(
            "SELECT * FROM consent_records WHERE ip_hash = ?", [ip_hash(subject.value)]
        ):
            found[_key(row)] = row
    return list(found.values())


def _key(row: dict[str, Any]) -> Any:
    return row.get("id", tuple(sorted(row.items())))


def pseudonym(secret: str, value: str) -> str:
    """A stable stand-in for an erased identifier: the same person maps to the same token
    (so repeated requests stay consistent), and without the secret nobody can reverse it."""
    mac = hmac.new(secret.encode(), b"erased:" + value.encode(), hashlib.sha256)
    return "erased-" + mac.hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Erased:
    hits: int
    consent_records: int  # kept as proof of consent, pseudonymous
    pseudonymised: int  # of those, rows whose identifying columns were replaced now
    tables: dict[str, int]
    span: tuple[int, int] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "consent_records_kept": self.consent_records,
            "consent_records_pseudonymised": self.pseudonymised,
            "tables": self.tables,
            "span_ms": list(self.span) if self.span else None,
        }


async def erase(
    storage: Storage,
    subject: Subject,
    secret: str,
    rebuilders: Sequence[Rebuilder],
    ip_hash: IpHash | None = None,
) -> Erased:
    """Delete the subject's hits and per-IP rows, pseudonymise consent records, rebuild.

    The consent feature's records hold no raw IP or visitor id (a keyed IP hash and the
    browser family) and are append-only evidence: they are kept as they are. Columns
    that would name the subject directly are replaced by a keyed pseudonym.
    """
    consent_cols = await table_columns(storage, "consent_records")
    tables = [
        (t, clause)
        for t in personal_tables()
        if (clause := t.where(subject)) and await table_columns(storage, t.name) is not None
    ]
    async with storage.transaction() as tx:
        scopes = await hits_where(tx, subject)  # before the hours tables lose the subject
        hits, when, consent_ids = await _delete_hits(tx, scopes)
        await subject_hours.hits_deleted(tx)
        counts = {
            t.name: await tx.execute(f"DELETE FROM {t.name} WHERE {clause}", [subject.value])
            for t, clause in tables
        }
        if any(t.name == "ipstat_daily" for t, _ in tables):
            # The per-IP rows went with the personal tables above. A writer that stored
            # value rows before leaves them out of later batches until the rewrite
            # generation moves: it must learn that these are gone (collector.ipstats).
            await rewrites.bump(tx)
        # Released blocks are history; active ones must keep naming the subject to work.
        counts["blocks"] = await tx.execute(
            "UPDATE blocks SET value = ? WHERE kind = ? AND value = ? AND released_at IS NOT NULL",
            [pseudonym(secret, subject.value), subject.kind, subject.value],
        )
        kept = await _consent_records(tx, consent_cols, subject, consent_ids, ip_hash)
        changed = await _pseudonymise(tx, kept, subject, secret) if kept else 0
        if when is not None:
            await rebuild(tx, rebuilders, when)
    await storage.settle_deletes()  # no copy of the erased rows left in the files
    return Erased(hits, len(kept), changed, counts, when)


async def _delete_hits(
    tx: Transaction, scopes: Sequence[tuple[str, Sequence[Any]]]
) -> tuple[int, tuple[int, int] | None, list[str]]:
    """Delete the hits the WHERE clauses ``scopes`` select: how many, their span
    [first, last + 1) and their consent ids.

    Each scope (a run of the subject's hours: there is no index on its value) is read
    once, a page at a time, and its rows deleted by id, where selecting the consent ids,
    the span and then deleting by the clause read it three times. Each page names its
    time range, so that PostgreSQL reads only the partitions that hold it.
    """
    deleted = 0
    lo: int | None = None
    hi = 0
    consent_ids: set[str] = set()
    for clause, params in scopes:
        since: list[int] = []  # deleted rows are gone: the next page starts at the last time
        while True:
            page = await tx.fetch_all(
                f"SELECT id, ts_ms, consent_id FROM hits WHERE {clause}"
                f"{' AND ts_ms >= ?' if since else ''} ORDER BY ts_ms LIMIT {_DELETE_CHUNK}",
                [*params, *since],
            )
            if not page:
                break
            first, last = page[0]["ts_ms"], page[-1]["ts_ms"]
            lo = first if lo is None else min(lo, first)
            hi = max(hi, last + 1)
            consent_ids.update(r["consent_id"] for r in page if r["consent_id"])
            marks = ", ".join("?" * len(page))
            deleted += await tx.execute(
                f"DELETE FROM hits WHERE ts_ms >= ? AND ts_ms <= ? AND id IN ({marks})",
                [first, last, *(r["id"] for r in page)],
            )
            if len(page) < _DELETE_CHUNK:
                break
            since = [last]
    return deleted, (lo, hi) if lo is not None else None, sorted(consent_ids)


async def _pseudonymise(
    tx: Transaction, rows: list[dict[str, Any]], subject: Subject, secret: str
) -> int:
    targets = [c for c in _IDENTIFYING if c in rows[0]]
    if not targets:
        return 0
    touched = 0
    for row in rows:
        values = [pseudonym(secret, str(row[c])) if row[c] else row[c] for c in targets]
        sets = ", ".join(f"{c} = ?" for c in targets)
        if "id" in row:
            where, params = "id = ?", [row["id"]]
        else:
            where, params = "consent_id = ?", [row["consent_id"]]
        touched += await tx.execute(
            f"UPDATE consent_records SET {sets} WHERE {where}", [*values, *params]
        )
    return touched
