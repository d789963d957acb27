"""The storage protocol and the row types that cross it.

Storage knows nothing of HTTP: it receives finished rows in batches from the writer and
answers queries. Every backend (SQLite, PostgreSQL) passes the same contract tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable


class RawHit(NamedTuple):
    """What the pixel gathered for a consented request, before enrichment."""

    ts_ms: int
    ip: str
    user_agent: str
    page: str
    referrer: str
    placement: str
    visitor_id: str
    session_id: str
    consent_id: str
    policy_version: str
    cookies: tuple[tuple[str, str], ...]
    source: str = "web"
    # App / server events (POST /collect); None for the pixel.
    event_id: str | None = None
    event_type: str | None = None
    client_ts_ms: int | None = None
    received_ms: int | None = None
    time_flag: str | None = None
    app_version: str | None = None
    os_name: str | None = None
    os_version: str | None = None
    device_model: str | None = None


class AnonHit(NamedTuple):
    """A request counted without personal data: no IP, no user agent, no cookie.

    ``state`` is the consent state: granted, refused, absent (no decision) or invalid
    (tampered, malformed, expired or stale). ``ip`` and ``user_agent`` are set only when
    ``[ipstats] without_consent`` is on (3.3.2 security counters): the writer turns the
    user agent into a bot flag and discards it; neither is ever stored with the page.
    """

    ts_ms: int
    page: str
    state: str
    ip: str = ""
    user_agent: str = ""


class HitRow(NamedTuple):
    """One stored hit: the six fields of clause 3.3 plus placement, geo and consent."""

    ts_ms: int
    ip: str
    visitor_id: str
    session_id: str
    cookies: str | None
    user_agent: str
    browser_family: str
    browser_version: str
    os_family: str
    os_version: str
    device_family: str
    device_brand: str
    device_class: str
    page_url: str | None
    referrer_url: str | None
    placement_id: str | None
    country: str | None
    region: str | None
    city: str | None
    consent_id: str
    policy_version: str
    source: str
    # App / server events only (migration 0008); NULL for pixel hits.
    event_id: str | None = None
    event_type: str | None = None
    client_ts_ms: int | None = None
    received_ms: int | None = None
    time_flag: str | None = None
    app_version: str | None = None
    device_model: str | None = None


HIT_COLUMNS: tuple[str, ...] = HitRow._fields

# (day 'YYYY-MM-DD', page path, consent state) -> hits
PixelCounts = Mapping[tuple[str, str, str], int]


@dataclass(slots=True)
class Batch:
    """Everything one writer flush stores, in one transaction."""

    hits: Sequence[HitRow] = ()
    pixel_counts: PixelCounts = field(default_factory=dict)
    # (ts_ms, ip, bot family or '') of requests without statistics consent, for the
    # per-IP security counters (3.3.2); empty unless [ipstats] without_consent is on.
    unconsented_ips: Sequence[tuple[int, str, str]] = ()
    # The storage may keep this batch's aggregates back, to write them summed with the
    # next batches' (``SQLiteStorage.write_batch``); False when someone waits for them
    # (``BatchWriter.flush``, shutdown).
    hold: bool = False

    def __len__(self) -> int:
        return len(self.hits)


Dialect = Literal["sqlite", "postgres"]
Statement = tuple[str, Sequence[tuple[Any, ...]]]


class Aggregator(Protocol):
    """Incremental aggregates kept in the batch's own transaction (rollups, IP statistics).

    Given a batch, return (sql, rows) pairs for ``executemany``; upserts that add to
    existing counts stay exact when several writers run at once. ``?`` placeholders;
    the PostgreSQL backend rewrites them to ``$n``. Qualify the old value in an upsert
    (``SET n = t.n + excluded.n``): PostgreSQL rejects a bare ``n`` as ambiguous.
    """

    def __call__(self, batch: Batch, dialect: Dialect) -> Iterable[Statement]: ...


class AggregateWindow(Protocol):
    """Aggregates of the hits added over one or more batches, written once."""

    def add(self, hits: Sequence[HitRow]) -> None: ...

    def statements(self) -> tuple[list[Statement], Callable[[], None]]:
        """The statements, and what to call once their transaction committed."""
        ...


@runtime_checkable
class WindowedAggregator(Protocol):
    """An aggregator that can sum several batches before it writes (SQLite's writer).

    ``window(generation)``: statements valid if the rewrite generation read by
    ``generation_sql`` (``collector.rewrites``) is still ``generation`` when they run;
    they may leave out what a process-local cache proves stored. ``per_batch``: the
    statements each batch must write itself (what has no raw rows to be recomputed from).
    """

    generation_sql: str

    def window(self, generation: int) -> AggregateWindow: ...

    def per_batch(self, batch: Batch) -> list[Statement]: ...

    def forget(self) -> None:
        """Empty the cache (the storage opened a database it may not describe)."""


class Storage(Protocol):
    """What every backend provides. Methods are safe to call from the event loop."""

    async def open(self) -> None:
        """Connect and migrate the schema to the newest version."""

    async def close(self) -> None:
        """Release connections; safe to call twice."""

    async def write_batch(self, batch: Batch) -> None:
        """Store a batch atomically (all rows or none); raise StorageError on failure."""

    async def ping(self) -> bool:
        """True when the database answers a trivial query."""

    async def schema_version(self) -> int:
        """The number of the newest applied migration."""

    # Generic access for the APIs, the CLI and governance. SQL is portable: ``?``
    # placeholders, times as integer milliseconds or ISO text passed as parameters.

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read query, as dicts (read connection; never blocks the writer)."""

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        """The first row of a read query, or None."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write statement in its own transaction; the number of rows it touched."""

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A write transaction for several statements (governance, audit chain)."""

    async def settle_deletes(self) -> bool:
        """After an erasure or a retention run: leave no copy of the deleted rows in the
        database's files where the backend can (SQLite: fold the WAL into the file and
        truncate it). True when it did; never raises; what it could not do is logged."""


class Transaction(Protocol):
    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None: ...

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
