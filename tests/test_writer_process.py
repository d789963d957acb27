"""``collector serve`` on SQLite: one writer process stores every worker's hits.

Real servers on loopback, a real SQLite file, real signals: the writer process is found
through /proc as the child running ``collector.writer_process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.aggregates import aggregators
from collector.storage import open_storage
from collector.storage.base import Batch, HitRow
from collector.writer_process import (
    _ENCODE_SLICE,
    BatchCollection,
    _Server,
    decode_batch,
    encode_batch,
)
from tests.conftest import Server, make_settings, rows
from tests.test_aggregate_window import make_hits, now_ms
from tests.test_server import _load, cookie_for

pytestmark = pytest.mark.slow

BATCH = 500
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


def writer_pids(server: Server) -> list[int]:
    """The server's children that run the writer process."""
    children: list[str] = []
    # Per thread: a replacement is started by serve's watcher thread.
    for task in Path(f"/proc/{server.proc.pid}/task").glob("*"):
        try:
            children += (task / "children").read_text().split()
        except OSError:
            pass
    found = []
    for pid in map(int, children):
        try:
            if b"collector.writer_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        time.sleep(0.05)


def stored(tmp_path: Path) -> int:
    return int(rows(tmp_path / "collector.db", "SELECT count(*) FROM hits")[0][0])


async def _under_load(
    server: Server, during: Callable[[], None], *, before: int = 300, after: int = 300
) -> int:
    """Send consented hits from 8 clients; call ``during`` once ``before`` are answered,
    go on until ``after`` more are; return how many were answered 200."""
    stop = asyncio.Event()
    progress = [0]
    cookie = cookie_for()
    tasks = [asyncio.create_task(_load(server.url, cookie, stop, progress)) for _ in range(8)]
    deadline = time.monotonic() + 60
    while progress[0] < before and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.to_thread(during)
    target = progress[0] + after
    while progress[0] < target and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    stop.set()
    return sum(answered for answered, _ in await asyncio.gather(*tasks))


def test_two_workers_share_one_writer_process(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(args=["--workers", "2"])
    wait_until(lambda: len(writer_pids(server)) == 1)
    (writer,) = writer_pids(server)
    socket_dir = next(
        Path(a.decode()).parent
        for a in Path(f"/proc/{writer}/cmdline").read_bytes().split(b"\0")
        if a.endswith(b".sock")
    )
    assert socket_dir.stat().st_mode & 0o777 == 0o700  # only our own user may connect
    headers = {"cookie": cookie_for(), "user-agent": CHROME}
    for i in range(200):
        # A new connection each time, so that both workers take requests.
        resp = httpx.get(f"{server.url}/p.gif", params={"u": f"https://s.kz/{i}"}, headers=headers)
        assert resp.status_code == 200
    assert server.stop() in (0, -signal.SIGTERM)
    # Enriched in the writer process: the same columns the in-process writer fills.
    found = rows(
        tmp_path / "collector.db",
        "SELECT count(*) AS n, count(DISTINCT page_url) AS pages, "
        "group_concat(DISTINCT browser_family || ' ' || os_family) AS agent FROM hits",
    )[0]
    assert (found["n"], found["pages"], found["agent"]) == (200, 200, "Chrome Windows")
    wait_until(lambda: not alive(writer))
    assert not socket_dir.exists()


async def test_a_killed_writer_process_is_replaced_and_loses_no_answered_hit(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve(env={"COLLECTOR_STORAGE_BATCH_SIZE": str(BATCH)})
    wait_until(lambda: len(writer_pids(server)) == 1)
    (first,) = writer_pids(server)

    def kill_writer() -> None:
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(writer_pids(server)) == 1 and writer_pids(server) != [first])

    answered = await _under_load(server, kill_writer)
    assert server.stop() in (0, -signal.SIGTERM)
    n = stored(tmp_path)
    print(f"answered={answered} stored={n}")
    assert answered > 500
    # Killed before its COMMIT, a batch is rolled back and sent again; killed between
    # COMMIT and its answer, one batch is stored twice (documented: at-least-once).
    assert answered <= n <= answered + BATCH
    assert "writer process exited" in server.log.read_text()


async def test_sigterm_to_every_process_at_once_loses_no_answered_hit(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    """A service manager that signals the whole group: the writer process outlives the
    workers that are still draining into it."""
    server = serve(env={"COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": "1500"})
    wait_until(lambda: len(writer_pids(server)) == 1)
    (writer,) = writer_pids(server)

    def terminate_all() -> None:
        os.kill(writer, signal.SIGTERM)
        server.proc.send_signal(signal.SIGTERM)

    answered = await _under_load(server, terminate_all, after=0)
    assert server.stop() in (0, -signal.SIGTERM)
    assert answered > 100
    assert stored(tmp_path) == answered
    wait_until(lambda: not alive(writer))


def test_writer_process_ends_when_serve_is_killed(serve: Callable[..., Server]) -> None:
    server = serve()
    wait_until(lambda: len(writer_pids(server)) == 1)
    (writer,) = writer_pids(server)
    server.stop(signal.SIGKILL)
    wait_until(lambda: not alive(writer))  # no orphan: its stdin closed with the parent


def test_the_writer_process_stores_with_sqlite_memory_statistics_off(
    serve: Callable[..., Server],
) -> None:
    # They cost every SQLite allocation a global mutex (storage/driver.py). The driver
    # turns them off only before any thread starts, so the writer imports it first.
    server = serve()
    ready = [
        json.loads(line)
        for line in server.log.read_text().splitlines()
        if '"writer process ready"' in line
    ]
    assert [r["sqlite_memory_statistics_off"] for r in ready] == [True]


async def test_a_big_batch_is_marshalled_in_slices_whole_and_in_order_between_pixels() -> None:
    # A worker marshals a batch in slices and lets the event loop answer pixels between
    # them (one 8,000-hit marshal was a ~7 ms stall, most of the flat-out p99). The
    # writer process must still get every hit, in order, with the batch's counters.
    hits = [
        HitRow(
            1_700_000_000_000 + i, f"10.0.{i // 256 % 256}.{i % 256}", f"{i:032x}", "s" * 32,
            None, "Mozilla/5.0", "Chrome", "120", "Windows", "10", "Other", "Other",
            "desktop", f"https://s.kz/p/{i % 97}", None, None, "GB", None, None, "c-1", "1",
            "web",
        )
        for i in range(2 * _ENCODE_SLICE + 7)
    ]  # fmt: skip
    batch = Batch(
        hits=hits,
        pixel_counts={("2023-11-14", "/p", "granted"): len(hits)},
        unconsented_ips=[(1, "10.9.9.9", "")],
        hold=True,
    )
    ticks = 0

    async def pixels() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    answering = asyncio.create_task(pixels())
    await asyncio.sleep(0)
    before = ticks
    payload = await encode_batch(batch, Counter(blocked=2))
    answering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answering
    assert ticks - before >= 2  # the loop ran between the three slices
    decoded, dropped = decode_batch(payload)
    assert decoded.hits == hits and all(type(h) is HitRow for h in decoded.hits)
    assert decoded.pixel_counts == batch.pixel_counts and decoded.hold
    assert list(decoded.unconsented_ips) == [(1, "10.9.9.9", "")]
    assert dropped == Counter(blocked=2)


async def test_a_batch_is_stored_without_collector_passes_and_one_pass_follows(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    storage = open_storage(settings, aggregators(settings), sole_writer=True)
    await storage.open()
    server = _Server(storage, keep=lambda hits: hits)
    hits = make_hits(3000, seed=1, start_ms=now_ms())
    batch = Batch(hits=hits, pixel_counts={("2026-12-06", "/", "granted"): len(hits)})
    payload = await encode_batch(batch, Counter())
    passes: list[int] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    gc.collect()  # counts at zero: no automatic pass before store() pauses them
    gc.callbacks.append(seen)
    try:
        reply = await server.store(payload)
    finally:
        gc.callbacks.remove(seen)
        await storage.close()
    assert reply == ("ok", ({"web": 3000}, {}, {}))
    assert stored(tmp_path) == 3000
    # Thousands of objects a batch made no automatic pass; one walked what was left.
    assert passes == [1]
    assert gc.isenabled()


class _Node:
    """A container that can be part of a reference cycle and be watched."""

    me: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    node = _Node()
    node.me = node
    return weakref.ref(node)


def test_a_cycle_made_during_a_batch_is_collected_after_it_even_when_the_batch_fails() -> None:
    collection = BatchCollection()
    with collection.after():
        assert not gc.isenabled()
        during = _cycle()
    assert during() is None and gc.isenabled()
    with pytest.raises(RuntimeError), collection.after():
        failed = _cycle()
        raise RuntimeError("the batch failed")
    assert failed() is None and gc.isenabled()


def test_a_collector_switched_off_stays_off_across_a_batch() -> None:
    gc.disable()
    try:
        with BatchCollection().after():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.skipif(
    sys.version_info >= (3, 14), reason="3.14's incremental GC: gc.collect(1) scans old objects"
)
def test_the_old_generation_is_collected_every_nth_batch() -> None:
    collection = BatchCollection(full_every=3)
    kept: list[_Node | None] = []
    with collection.after():  # batch 1: the cycle is alive, so the pass moves it on
        node = _Node()
        node.me = node
        old = weakref.ref(node)
        kept.append(node)
        del node
    kept.clear()  # garbage now, in the generation young passes leave alone
    with collection.after():  # batch 2: a young pass
        pass
    assert old() is not None
    with collection.after():  # batch 3: the full pass
        pass
    assert old() is None
