"""One writer process for SQLite: every worker's batches, stored off the pixel's cores.

Why a process: the pixel's event loop and the writer's work (SQLite's inserts, index
updates and rollup upserts) shared one core and the GIL when the writer ran inside the
worker; py-spy put ~40% of that core in SQLite alone (docs/PERFORMANCE.md).
``collector serve`` starts one writer process beside uvicorn. A worker's ``BatchWriter``
still buffers what the pixel accepts and builds each batch itself (enrichment: user
agent, GeoIP, URLs; the anonymous counters), between pixel requests; its sink is
``RemoteSink``, which ships the built batch over a Unix socket to this process. Here the
batch meets the block list, the aggregators and the one SQLite write connection. With
several workers this ends their contention for SQLite's write lock, and keeps the serial
part -- this process -- as small as it can be: per-hit work that needs no shared state
runs in the workers, in parallel (docs/PERFORMANCE.md, session 4).

The writer's contract is kept: ``deliver`` returns once the batch is committed (the
writer process answers after COMMIT) with a ``Tally`` for the worker's metrics, and an
outage comes back as ``StorageError``, so the worker retries, keeps buffering and
reports it in ``/healthz``. A crash of the writer process between its COMMIT and its
answer makes the worker send that batch again (at-least-once, like the PostgreSQL
spool); a crash before COMMIT loses nothing, SQLite rolls the batch back.

Wire format: a 4-byte big-endian length, then ``marshal`` data of plain tuples, lists,
dicts, strings, ints and bytes (the hits travel as ``marshal`` strings of up to 2,048
rows each: ``encode_batch``); ``marshal`` runs no code when it loads. The socket lives in a
fresh 0700 directory, so only the server's own user can connect.

Lifetime: the process ignores SIGINT and SIGTERM and runs in its own session, so a
Ctrl-C or a service manager's TERM to the whole group cannot stop it while workers are
still draining into it; it exits when its stdin reaches end of file, that is when
``collector serve`` ends (or dies, even by SIGKILL), after finishing the batch in hand.
``serve`` restarts it if it dies; meanwhile workers buffer and retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import marshal
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from collector.errors import CollectorError, StorageError
from collector.storage.base import Batch, HitRow, Storage
from collector.writer import BatchBuilder, Filter, Item, Tally

logger = logging.getLogger("collector.writer_process")  # also when run as __main__

SOCKET_ENV = "COLLECTOR_WRITER_SOCKET"  # set by ``serve`` for its workers
_MAX_FRAME = 1 << 30
_READY = b"ready\n"
_tuple = tuple.__new__


_ENCODE_SLICE = 2048  # hits marshalled between yields to the event loop


async def encode_batch(batch: Batch, dropped: Counter[str]) -> bytes:
    """A built batch, and what its worker dropped building it, as one frame's payload.

    The hits go in slices of ``_ENCODE_SLICE``, each its own ``marshal`` string, with a
    yield to the event loop between them. Marshalling a batch of 8,000 hits at once
    took ~7 ms, in which the worker answered no pixel: flat out, that one stall per
    batch was most of the p99 (11.6 against 6.7 ms in the same run;
    docs/PERFORMANCE.md, session 8). Slices of 2,048 keep nearly all of marshal's
    sharing of repeated strings, so the writer process decodes them about as fast.
    """
    hits = batch.hits
    slices: list[bytes] = []
    for start in range(0, len(hits), _ENCODE_SLICE):
        if start:
            await asyncio.sleep(0)
        slices.append(marshal.dumps(list(map(tuple, hits[start : start + _ENCODE_SLICE]))))
    return marshal.dumps(
        (
            slices,
            dict(batch.pixel_counts),
            list(batch.unconsented_ips),
            dict(dropped),
            batch.hold,
        )
    )


def decode_batch(data: bytes) -> tuple[Batch, Counter[str]]:
    slices, counts, unconsented, dropped, hold = marshal.loads(data)
    # ``HitRow._make`` is a Python-level classmethod call per hit; the frames come from
    # our own workers (a 0700 socket) and carry whole rows, so they are typed directly.
    rows: list[HitRow] = [_tuple(HitRow, h) for part in slices for h in marshal.loads(part)]
    batch = Batch(hits=rows, pixel_counts=counts, unconsented_ips=unconsented, hold=hold)
    return batch, Counter(dropped)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > _MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is too large")
    return await reader.readexactly(size)


def _frame(payload: bytes) -> list[bytes]:
    return [len(payload).to_bytes(4, "big"), payload]


# --- the workers' side -------------------------------------------------------------------


class RemoteSink:
    """The ``BatchWriter`` sink of a worker: built batches to the writer process.

    The worker builds the batch itself (``BatchBuilder``: enrichment, the anonymous
    counters, its block list), in slices between pixel requests: that work is per hit
    and needs no shared state, so with several workers it runs in parallel, and the one
    writer process -- every worker's serial bottleneck -- is left with what must be
    serial: the blocks as of the transaction, the aggregates and the transaction itself.
    ``deliver`` returns once the writer process has committed the batch, with its tally
    (stored, dropped, counted without consent) for this worker's metrics.
    """

    def __init__(self, socket_path: str, builder: BatchBuilder) -> None:
        self.socket_path = socket_path
        self.builder = builder
        self.filters: list[Filter] = builder.filters
        self._lock = asyncio.Lock()
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def prepare(self, items: Sequence[Item], hold: bool) -> bytes:
        return await encode_batch(*await self.builder.build(items, hold))

    async def deliver(self, job: bytes) -> Tally:
        async with self._lock:
            try:
                if self._conn is None:
                    self._conn = await asyncio.open_unix_connection(self.socket_path)
                reader, writer = self._conn
                writer.writelines(_frame(job))
                await writer.drain()
                status, detail = marshal.loads(await _read_frame(reader))
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError) as exc:
                self.close()
                reason = str(exc) or type(exc).__name__
                raise StorageError(f"writer process unreachable: {reason}") from exc
            except BaseException:
                self.close()  # a reply may still be on its way: start afresh
                raise
        if status == "storage":
            raise StorageError(detail)
        if status != "ok":
            raise RuntimeError(f"writer process failed on a batch: {detail}")
        return Tally.from_wire(detail)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()


# --- the writer process -------------------------------------------------------------------


class BatchCollection:
    """The cyclic garbage collector, run after each batch instead of during it.

    Storing a batch makes ~10 container objects a hit (decoded rows, window keys,
    statement parameters) that live until the batch is committed, and the collector's
    automatic young-generation passes, one every 700 net allocations on 3.11, walk
    each of them again and again meanwhile: 7-8% of this process's CPU at the bench's
    load, and no pass ever found a cycle (docs/PERFORMANCE.md, session 10). Paused
    while a batch is stored and run once after it, when the batch's objects are gone,
    a pass walks only what the aggregation window keeps. Cycles still go within one
    batch; the old generation is collected every ``full_every`` batches at least. The
    pause is process-wide: whatever runs beside a batch (an idle window end, a block
    list refresh, the SQLite thread) runs without automatic passes too, and the pass
    after the batch collects its young cycles; between batches the automatic collector
    runs as usual. A caller that had switched the collector off keeps it off. (Python
    3.14's incremental collector gives ``gc.collect(1)`` another meaning; the tests run
    on 3.11.)
    """

    def __init__(self, full_every: int = 64) -> None:
        self.full_every = full_every
        self.batches = 0

    @contextlib.contextmanager
    def after(self) -> Iterator[None]:
        if not gc.isenabled():
            yield
            return
        gc.disable()
        try:
            yield
        finally:
            gc.enable()
            self.batches += 1
            gc.collect(2 if self.batches % self.full_every == 0 else 1)


class _Server:
    """Stores the batches of every connected worker, one at a time."""

    def __init__(self, storage: Storage, keep: Filter) -> None:
        self.storage = storage
        # The block list as this process knows it: a block made a moment ago through
        # another worker reaches every hit stored after it (6.2.4).
        self.keep = keep
        self.lock = asyncio.Lock()
        self.collection = BatchCollection()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    # No name here holds the frame: store() frees the bytes and the raw
                    # items as soon as it is done with them (a batch is up to 8,000 hits).
                    reply = await self.store(await _read_frame(reader))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the worker went away (it reconnects when it needs to)
                writer.writelines(_frame(marshal.dumps(reply)))
                await writer.drain()
        except (ConnectionError, ValueError) as exc:
            logger.warning("dropping a worker connection: %s", exc)
        finally:
            writer.close()

    async def store(self, data: bytes) -> tuple[str, Any]:
        async with self.lock:
            with self.collection.after():
                try:
                    batch, dropped = decode_batch(data)
                    del data
                    kept = self.keep(batch.hits)
                    if len(kept) != len(batch.hits):
                        dropped["blocked"] += len(batch.hits) - len(kept)
                        batch.hits = kept
                    await self.storage.write_batch(batch)
                except StorageError as exc:
                    return ("storage", exc.detail)
                except Exception as exc:
                    logger.exception("storing a batch failed unexpectedly")
                    return ("bug", f"{type(exc).__name__}: {exc}")
                tally = Tally(dropped=dropped)
                tally.add_stored(batch)
                del batch, kept  # gone before the collection walks what is left
        return ("ok", tally.to_wire())


async def run_writer(socket_path: str, stop: asyncio.Event) -> None:
    """The writer process's life: open storage, serve workers until ``stop``, drain."""
    from collector.aggregates import aggregators
    from collector.backup import DatabaseLock
    from collector.blocking import BlockList
    from collector.config import load_settings, resolve_secret
    from collector.logs import configure_logging
    from collector.storage import open_storage
    from collector.storage.driver import MEMORY_STATISTICS_OFF

    settings = resolve_secret(load_settings(os.environ.get("COLLECTOR_CONFIG") or None))
    configure_logging(settings.server)
    storage = open_storage(settings, aggregators(settings), sole_writer=True)
    lock = DatabaseLock(Path(settings.storage.path))
    await storage.open()
    await lock.acquire_shared()
    blocks = BlockList(storage)
    await blocks.start()
    server = _Server(storage, blocks.keep)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # left by a predecessor that was killed
    listener = await asyncio.start_unix_server(server.handle, path=socket_path)
    os.chmod(socket_path, 0o600)
    gc.collect()
    gc.freeze()  # schema, statements, block list: out of the cyclic collector's scans
    logger.info(
        "writer process ready",
        extra={"pid": os.getpid(), "sqlite_memory_statistics_off": MEMORY_STATISTICS_OFF},
    )
    sys.stdout.buffer.write(_READY)
    sys.stdout.buffer.flush()
    try:
        await stop.wait()
    finally:
        listener.close()
        async with server.lock:  # the batch in hand is committed before we close
            await blocks.stop()
            await storage.close()
        lock.release()
        logger.info("writer process stopped", extra={"pid": os.getpid()})


def _main(socket_path: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Imported before any thread starts: SQLite's memory statistics go off only in a
    # process that runs no other thread yet (storage/driver.py), and this one writes.
    import collector.storage.driver  # noqa: F401

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wait_for_eof() -> None:
            sys.stdin.buffer.read()  # returns when ``serve`` closes the pipe or dies
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_eof, name="stdin-eof", daemon=True).start()
        await run_writer(socket_path, stop)

    try:
        import uvloop

        uvloop.run(main())
    except CollectorError as exc:
        print(f"collector writer: {exc.detail}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        # ``serve`` may have died by its signal before it could clean up: leave nothing.
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(socket_path))
    return 0


# --- ``collector serve``'s side -------------------------------------------------------------


class WriterProcess:
    """Starts the writer process, restarts it if it dies, ends it after the workers."""

    def __init__(self, ready_timeout_s: float = 60.0) -> None:
        self.ready_timeout_s = ready_timeout_s
        self.directory = Path(tempfile.mkdtemp(prefix="collector-writer-"))  # mode 0700
        self.socket_path = str(self.directory / "writer.sock")
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._watcher: threading.Thread | None = None

    def start(self) -> str:
        """Start the process and wait until it serves; the socket path for the workers."""
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="writer-watch", daemon=True)
        self._watcher.start()
        return self.socket_path

    def _spawn(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "collector.writer_process", self.socket_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._proc = proc
        assert proc.stdout is not None
        line = _readline_within(proc.stdout, self.ready_timeout_s)
        if line != _READY:
            proc.kill()
            proc.wait()
            raise StorageError("the writer process did not start (its error is logged above)")

    def _watch(self) -> None:
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            code = proc.wait()
            if self._stopping:
                return
            logger.error("writer process exited (code %s); starting a new one", code)
            time.sleep(0.5)
            while not self._stopping:
                try:
                    self._spawn()
                    break
                except (OSError, StorageError):
                    logger.exception("restarting the writer process failed; trying again")
                    time.sleep(2)

    def stop(self, timeout_s: float = 60.0) -> None:
        """After the workers have drained into it: let it finish and exit."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("writer process did not stop within %.0f s; killing it", timeout_s)
                proc.kill()
                proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _readline_within(stream: Any, timeout_s: float) -> bytes:
    """One line from a pipe, or b'' when the process exits or the time is up."""
    found: list[bytes] = []
    reader = threading.Thread(target=lambda: found.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return found[0] if found else b""


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
