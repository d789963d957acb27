"""BatchWriter: the only path from the pixel to storage.

The pixel appends to an in-memory buffer and answers at once; one background task swaps
the buffer out every ``flush_interval_ms`` (or as soon as ``batch_size`` items wait),
enriches the hits and stores them in one transaction. Under load the interval, not the
size, ends a batch, so batches grow with the traffic (up to ``batch_size``): a
transaction of 8,000 hits costs ~35% less CPU per hit than four of 2,000 (index pages
are written once, rollup keys repeat), and a writer that fell behind catches up.
Appending is a list append, and draining is a swap, so the request path pays nothing for
the disk.

Guarantees:
- bounded memory: past ``queue_size`` items (waiting or being written) a request waits
  up to ``queue_wait_ms`` for space, then its hit is dropped and counted;
- a failed write is retried with back-off while the buffer keeps filling (health goes
  red, ``/healthz`` says why), and recording resumes by itself when storage recovers;
- ``stop()`` drains everything that was accepted before it returns (graceful shutdown).

Where a batch goes is the writer's ``sink``: ``LocalSink`` builds (enriches) and stores it
in this process; under ``collector serve`` with SQLite, ``writer_process.RemoteSink``
builds it here too and ships the built batch to the one writer process, which filters
and stores it there and answers with a ``Tally`` that this process turns into its
metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from collector.enrich import Enricher
from collector.errors import StorageError
from collector.metrics import Metrics
from collector.storage.base import AnonHit, Batch, HitRow, RawHit, Storage

logger = logging.getLogger(__name__)

Item = RawHit | AnonHit
Filter = Callable[[Sequence[HitRow]], Sequence[HitRow]]
_ENRICH_SLICE = 256  # rows enriched between yields to the event loop, to bound latency


@dataclass(slots=True)
class Tally:
    """What storing some items came to, for the metrics of the process that queued them."""

    recorded: Counter[str] = field(default_factory=Counter)  # stored hits by source
    without_consent: Counter[str] = field(default_factory=Counter)  # by consent state
    dropped: Counter[str] = field(default_factory=Counter)  # by reason

    def add_stored(self, batch: Batch) -> None:
        self.recorded.update(hit.source for hit in batch.hits)
        for (_, _, state), n in batch.pixel_counts.items():
            if state != "granted":
                self.without_consent[state] += n

    def to_wire(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        return dict(self.recorded), dict(self.without_consent), dict(self.dropped)

    @classmethod
    def from_wire(cls, wire: Any) -> Tally:
        recorded, without, dropped = wire
        return cls(Counter(recorded), Counter(without), Counter(dropped))


class BatchBuilder:
    """Raw items -> one ``Batch``: enrichment, anonymous counts, then the filters (blocks)."""

    def __init__(self, enricher: Enricher) -> None:
        self.enricher = enricher
        self.filters: list[Filter] = []
        self._days: dict[int, str] = {}

    def _day(self, ts_ms: int) -> str:
        key = ts_ms // 86_400_000
        day = self._days.get(key)
        if day is None:
            day = time.strftime("%Y-%m-%d", time.gmtime(key * 86_400))
            if len(self._days) > 64:
                self._days.clear()
            self._days[key] = day
        return day

    async def build(self, items: Sequence[Item], hold: bool) -> tuple[Batch, Counter[str]]:
        """The batch, and the hits dropped on the way (by reason); ``hold``: see
        ``Batch.hold``."""
        rows: list[HitRow] = []
        counts: Counter[tuple[str, str, str]] = Counter()
        unconsented: list[tuple[int, str, str]] = []
        dropped: Counter[str] = Counter()
        path = self.enricher.urls.path
        row = self.enricher.row
        for i, item in enumerate(items):
            try:
                if isinstance(item, RawHit):
                    r = row(item)
                    rows.append(r)
                    counts[(self._day(item.ts_ms), _path_of(r.page_url, path), "granted")] += 1
                else:
                    counts[(self._day(item.ts_ms), path(item.page), item.state)] += 1
                    if item.ip:  # 3.3.2 security counters: the user agent ends here
                        agent = self.enricher.ua(item.user_agent[:512])
                        bot = agent.family if agent.is_bot else ""
                        unconsented.append((item.ts_ms, item.ip, bot))
            except Exception:
                # On purpose: one hit that trips a bug in enrichment must not stop the
                # writer, which would silently end all recording. Counted and logged.
                dropped["internal_error"] += 1
                logger.exception("could not enrich a hit; it is dropped")
            if i % _ENRICH_SLICE == _ENRICH_SLICE - 1:
                await asyncio.sleep(0)
        kept: Sequence[HitRow] = rows
        for keep in self.filters:
            kept = keep(kept)
        if len(kept) != len(rows):
            dropped["blocked"] += len(rows) - len(kept)
        batch = Batch(hits=kept, pixel_counts=counts, unconsented_ips=unconsented, hold=hold)
        return batch, dropped


class Sink(Protocol):
    """Where the writer's batches go. ``prepare`` runs once per batch, ``deliver`` once
    per attempt: it raises ``StorageError`` for an outage (the writer retries) and
    anything else for a bug (the writer drops the batch)."""

    filters: list[Filter]

    async def prepare(self, items: Sequence[Item], hold: bool) -> Any: ...

    async def deliver(self, job: Any) -> Tally: ...


class LocalSink:
    """Enrich and store in this process (tests, embedding, PostgreSQL nodes)."""

    def __init__(self, storage: Storage, builder: BatchBuilder) -> None:
        self.storage = storage
        self.builder = builder
        self.filters = builder.filters

    async def prepare(self, items: Sequence[Item], hold: bool) -> tuple[Batch, Counter[str]]:
        return await self.builder.build(items, hold)

    async def deliver(self, job: tuple[Batch, Counter[str]]) -> Tally:
        batch, dropped = job
        await self.storage.write_batch(batch)
        tally = Tally(dropped=Counter(dropped))
        tally.add_stored(batch)
        return tally


class BatchWriter:
    def __init__(
        self,
        storage: Storage,
        enricher: Enricher | None,
        *,
        batch_size: int,
        flush_interval_ms: int,
        queue_size: int,
        queue_wait_ms: int,
        metrics: Metrics,
        shutdown_retry_s: float = 10.0,
        sink: Sink | None = None,
    ) -> None:
        if sink is None:
            if enricher is None:
                raise ValueError("a BatchWriter without a sink needs an enricher")
            sink = LocalSink(storage, BatchBuilder(enricher))
        self.sink: Sink = sink
        # Filters (blocks) run where the batch is built: here, or in the writer process.
        self.filters = self.sink.filters
        self.batch_size = batch_size
        self.interval = flush_interval_ms / 1000
        self.max_items = queue_size
        self.wait_s = queue_wait_ms / 1000
        self.metrics = metrics
        self.shutdown_retry_s = shutdown_retry_s
        self.healthy = True
        self.last_error: str | None = None
        self.housekeeping: list[Callable[[], None]] = []
        self._buf: list[Item] = []
        self._in_flight = 0
        self._wake: asyncio.Event | None = None
        self._space: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._flushing = 0  # flush() calls waiting
        self._dropped_full = metrics.hits_dropped.labels("queue_full")
        self._dropped_err = metrics.hits_dropped.labels("storage_error")
        self._last_drop_log = 0.0
        metrics.track_queue(self.depth)

    def depth(self) -> int:
        return len(self._buf) + self._in_flight

    # --- producer side (the pixel) --------------------------------------------------

    def has_room(self) -> bool:
        """``put_nowait`` would accept an item now (and still will until the loop yields)."""
        return self._wake is not None and len(self._buf) + self._in_flight < self.max_items

    def put_nowait(self, item: Item) -> bool:
        buf = self._buf
        # The batch being written counts: memory holds queue_size items at most.
        if len(buf) + self._in_flight >= self.max_items or self._wake is None:
            return False
        buf.append(item)
        # Wake the writer on the first item (it then gathers for one flush interval) and
        # when a batch is full; in between, appending is all a request pays.
        n = len(buf)
        if (n == 1 or n >= self.batch_size) and not self._wake.is_set():
            self._wake.set()
        return True

    async def put(self, item: Item) -> bool:
        """Queue ``item``; when full, wait up to ``queue_wait_ms`` for space, then drop it.

        Waiting is back-pressure: a writer that is merely behind slows the pixel's answers
        (an invisible image arrives later) instead of losing hits. While storage is
        failing the request does not wait: an outage must not pile up waiting requests.
        """
        if self.put_nowait(item):
            return True
        deadline = time.monotonic() + self.wait_s
        while self.healthy and self._space is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._space.clear()
            try:
                await asyncio.wait_for(self._space.wait(), remaining)
            except TimeoutError:
                pass
            if self.put_nowait(item):
                return True
        self._dropped_full.inc()
        now = time.monotonic()
        if now - self._last_drop_log > 5:
            self._last_drop_log = now
            logger.error(
                "hit dropped: write queue full (%d waiting); storage is too slow or failing",
                len(self._buf),
            )
        return False

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="collector-batch-writer")

    async def stop(self) -> None:
        """Drain every accepted item into storage, then end the task (safe twice)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        assert self._wake is not None
        self._wake.set()
        await task
        self._wake = None

    async def flush(self) -> None:
        """Wait until everything queued so far is stored (tests, backups, shutdown)."""
        if self._wake is None:
            return
        self._flushing += 1  # the batches cut meanwhile write their aggregates too
        try:
            self._wake.set()
            while self._buf or self._in_flight:
                self._wake.set()
                await asyncio.sleep(0.002)
        finally:
            self._flushing -= 1

    # --- consumer side --------------------------------------------------------------------

    async def _run(self) -> None:
        """Gather, build, deliver: a batch is built while the one before it is stored.

        With the writer process as the sink, building runs here and storing there, on
        another core; run one after the other, each side waited for the other, and
        the queue stood fuller under load (flat-out p99 13.7 against 10.0 ms in the same
        run; docs/PERFORMANCE.md, session 6). Deliveries stay one at a time and in
        order, and the items of both stages count against ``queue_size``.
        """
        assert self._wake is not None
        wake = self._wake
        backlog = False  # items were left behind by the last batch: no gathering pause
        delivering: asyncio.Task[None] | None = None
        try:
            while True:
                if not self._buf:
                    if self._stopping:
                        return
                    try:
                        await asyncio.wait_for(wake.wait(), 1.0)
                    except TimeoutError:
                        self._housekeep()
                        continue
                if not backlog and len(self._buf) < self.batch_size and not self._stopping:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), self.interval)
                    except TimeoutError:
                        pass
                wake.clear()
                # What waits, up to batch_size (not the whole buffer, so that one
                # transaction stays bounded). The items count as in flight until their
                # batch is stored: memory holds queue_size items at most.
                n = min(len(self._buf), self.batch_size)
                self._in_flight += n
                backlog = len(self._buf) > n
                # Aggregates may wait for the next batches unless someone waits for them.
                hold = not (self._stopping or self._flushing)
                try:
                    items = self._take(n)
                    consented = _consented(items)
                    job = await self.sink.prepare(items, hold)
                    del items  # RSS: only the built batch stays (up to 8,000 hits)
                except BaseException:
                    self._landed(n)
                    raise
                if delivering is not None:
                    await delivering
                delivering = asyncio.create_task(self._deliver(job, consented, n))
                del job  # the delivery holds it, and lets it go once stored
        finally:
            if delivering is not None:
                await delivering

    def _landed(self, n: int) -> None:
        """``n`` items left the queue (stored, or given up): room for the pixel."""
        self._in_flight -= n
        if self._space is not None:
            self._space.set()

    def _housekeep(self) -> None:
        for task in self.housekeeping:
            try:
                task()
            except Exception:  # a housekeeping bug must not stop recording
                logger.exception("writer housekeeping task failed")

    def _take(self, n: int) -> list[Item]:
        items = self._buf[:n]
        del self._buf[:n]
        return items

    async def _deliver(self, job: Any, consented: int, n: int) -> None:
        """Store one built batch of ``n`` items, retrying through outages."""
        try:
            await self._deliver_retrying(job, consented)
        finally:
            self._landed(n)
            self._housekeep()

    async def _deliver_retrying(self, job: Any, consented: int) -> None:
        delay = 0.05
        deadline: float | None = None
        while True:
            started = time.perf_counter()
            try:
                tally = await self.sink.deliver(job)
            except StorageError as exc:
                self.metrics.storage_errors.inc()
                if self.healthy or self.last_error != exc.detail:
                    logger.error("batch write failed, retrying: %s", exc.detail)
                self.healthy = False
                self.last_error = exc.detail
                if self._stopping:
                    deadline = deadline or time.monotonic() + self.shutdown_retry_s
                    if time.monotonic() > deadline:
                        lost = consented
                        self._dropped_err.inc(lost)
                        logger.error("shutting down with storage failing: %d hits lost", lost)
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except Exception:
                # A bug (not an outage): retrying the same batch would fail forever and
                # block every later hit, so this batch is dropped, counted and logged.
                lost = consented
                self.metrics.hits_dropped.labels("internal_error").inc(lost)
                logger.exception("storing a batch failed unexpectedly; %d hits dropped", lost)
                return
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            break
        if not self.healthy:
            logger.warning("storage recovered; recording resumed")
        self.healthy = True
        self.last_error = None
        self._count(tally)

    def _count(self, tally: Tally) -> None:
        for source, n in tally.recorded.items():
            self.metrics.hits_recorded.labels(source).inc(n)
        for state, n in tally.without_consent.items():
            self.metrics.hits_without_consent.labels(state).inc(n)
        for reason, n in tally.dropped.items():
            self.metrics.hits_dropped.labels(reason).inc(n)


def _consented(items: Sequence[Item]) -> int:
    return sum(1 for item in items if isinstance(item, RawHit))


def _path_of(page_url: str | None, path: Callable[[str], str]) -> str:
    return path(page_url) if page_url else "(none)"
