"""The hours tables that lead subject access, erasure and blocking to a subject's hits.

On SQLite the batch writer notes them itself, for every id above a mark of what is noted
(``subject_hours.NOTED_UP_TO``): in each batch's transaction, or, in the writer process
(the file's sole writer), once ``_NOTE_HITS`` hits are waiting, with every lookup noting
what waits first. These tests hold both to the truth a full scan of ``hits`` gives:
across returning subjects, erasures and retention run by another connection, batches
that fail, and hits stored by plain SQL.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from collector import blocking, retention, subject_hours
from collector.block_targets import Target
from collector.config import Settings
from collector.errors import StorageError
from collector.storage import sqlite as sqlite_storage
from collector.storage.base import Batch, HitRow
from collector.storage.driver import connect
from collector.storage.sqlite import SQLiteStorage
from collector.subject_hours import HOUR_MS
from collector.subjects import Subject, erase
from tests.conftest import SECRET, make_settings
from tests.test_storage import sample_row

NOW = 1_780_000_000_000  # 2026-05-28
DAY = 86_400_000
PACKAGE = Path(__file__).resolve().parent.parent / "collector"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


# Every batch notes its hits' hours, or (the writer process) they wait for _NOTE_HITS.
MODES = {"every batch": False, "writer process": True}


@pytest.fixture(params=list(MODES))
def sole(request: pytest.FixtureRequest) -> bool:
    return MODES[request.param]


async def _opened(settings: Settings, *, sole: bool = False) -> AsyncIterator[SQLiteStorage]:
    storage = SQLiteStorage(settings, sole_writer=sole)
    await storage.open()
    yield storage
    await storage.close()


@pytest.fixture
async def writer(settings: Settings, sole: bool) -> AsyncIterator[SQLiteStorage]:
    async for storage in _opened(settings, sole=sole):
        yield storage


@pytest.fixture
async def other(settings: Settings) -> AsyncIterator[SQLiteStorage]:
    """Another connection to the same file, as the CLI or the governance API has."""
    async for storage in _opened(settings):
        yield storage


def hit(ts_ms: int, visitor: str, ip: str) -> HitRow:
    return sample_row(ts_ms=ts_ms, visitor_id=visitor, ip=ip)


async def noted(
    storage: SQLiteStorage, *, lookup: bool = False
) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """What the hours tables hold; with ``lookup``, as a lookup finds them (after noting
    the hits above the mark, which only the writer process leaves there)."""
    if lookup:
        await subject_hours.catch_up(storage)
    visitors = await storage.fetch_all("SELECT visitor_id, hour FROM visitor_hours")
    ips = await storage.fetch_all("SELECT ip, hour FROM ip_hours")
    return (
        {(r["visitor_id"], r["hour"]) for r in visitors},
        {(r["ip"], r["hour"]) for r in ips},
    )


async def truth(storage: SQLiteStorage) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """What the hours tables must hold: every stored hit's hours, by a full scan."""
    found = await storage.fetch_all("SELECT ts_ms, ip, visitor_id FROM hits")
    return (
        {(r["visitor_id"], r["ts_ms"] // HOUR_MS) for r in found if r["visitor_id"]},
        {(r["ip"], r["ts_ms"] // HOUR_MS) for r in found},
    )


async def store(storage: SQLiteStorage, hits: Sequence[HitRow]) -> None:
    await storage.write_batch(Batch(hits=list(hits)))


async def test_every_stored_hit_has_its_hours_noted(writer: SQLiteStorage, sole: bool) -> None:
    # Returning visitors and addresses within the hour and across hours, new ones, hits
    # without a visitor id.
    for batch in range(12):
        at = NOW + batch * HOUR_MS // 5
        visitors = [f"{(batch * 7 + i) % 9:032x}" for i in range(6)]
        hits = [hit(at + i, v, f"10.0.0.{i % 4}") for i, v in enumerate(visitors)]
        await store(writer, [*hits, hit(at, "", f"10.1.0.{batch}")])
        assert await noted(writer, lookup=sole) == await truth(writer)
    visitors, ips = await truth(writer)
    assert len(visitors) > 9 and len(ips) > 8  # subjects came back in later hours


async def test_a_subject_erased_elsewhere_is_noted_again_when_it_returns(
    writer: SQLiteStorage, sole: bool, other: SQLiteStorage
) -> None:
    alice, ip = "a" * 32, "192.0.2.7"
    await store(writer, [hit(NOW, alice, ip)])
    erased = await erase(other, Subject("visitor", alice), SECRET, [])
    assert erased.hits == 1
    assert await noted(writer, lookup=sole) == (
        set(),
        {(ip, NOW // HOUR_MS)},
    )  # the address had no erasure
    # Alice comes back within the hour the writer noted before the erasure.
    await store(writer, [hit(NOW + 1, alice, ip)])
    assert await noted(writer, lookup=sole) == await truth(writer)
    again = await erase(other, Subject("ip", ip), SECRET, [])
    assert again.hits == 1
    await store(writer, [hit(NOW + 2, alice, ip)])
    assert await noted(writer, lookup=sole) == await truth(writer)
    assert (await erase(other, Subject("visitor", alice), SECRET, [])).hits == 1


async def test_hours_retention_forgot_are_noted_again_for_late_hits(
    writer: SQLiteStorage, sole: bool, other: SQLiteStorage, settings: Settings
) -> None:
    # Late hits in an hour that retention then forgets (its cutoff is ahead of them).
    old = NOW - 400 * DAY
    await store(writer, [hit(old, "a" * 32, "192.0.2.7")])
    plan = await retention.plan(other, settings, now_ms=NOW)
    assert await retention.purge(other, plan, chunk_size=100) == 1
    assert await noted(writer, lookup=sole) == (set(), set())
    await store(writer, [hit(old + 1, "a" * 32, "192.0.2.7")])
    assert await noted(writer, lookup=sole) == await truth(writer) != (set(), set())
    # The hours alone forgotten, as retention does last.
    await other.execute("DELETE FROM hits")
    await subject_hours.purge(other, NOW)
    await store(writer, [hit(old + 2, "a" * 32, "192.0.2.7")])
    assert await noted(writer, lookup=sole) == await truth(writer) != (set(), set())


async def test_a_batch_that_failed_leaves_no_hours_and_the_next_notes_its_own(
    writer: SQLiteStorage,
    sole: bool,
) -> None:
    alice, ip = "a" * 32, "192.0.2.7"
    broken = sample_row(ts_ms=NOW, visitor_id="b" * 32, user_agent=None)  # NOT NULL
    with pytest.raises(StorageError):
        await store(writer, [hit(NOW, alice, ip), broken])
    assert await noted(writer, lookup=sole) == (set(), set())
    await store(writer, [hit(NOW + 1, alice, ip)])
    assert await noted(writer, lookup=sole) == ({(alice, NOW // HOUR_MS)}, {(ip, NOW // HOUR_MS)})


async def test_a_batch_under_a_mark_left_too_high_still_notes_its_own_hits(
    writer: SQLiteStorage, sole: bool, other: SQLiteStorage
) -> None:
    # The newest hit deleted by hand leaves the mark above the ids the next batch gets
    # (noted by a lookup first, where the writer process had not noted them yet).
    await store(writer, [hit(NOW, "a" * 32, "192.0.2.7"), hit(NOW + 1, "b" * 32, "192.0.2.8")])
    await subject_hours.catch_up(other)
    await other.execute("DELETE FROM hits WHERE visitor_id = ?", ["b" * 32])
    await store(writer, [hit(NOW + 2, "c" * 32, "192.0.2.9")])  # id 2 again
    visitors, _ = await noted(writer, lookup=sole)
    assert ("c" * 32, NOW // HOUR_MS) in visitors


async def test_hits_another_writer_stored_are_noted_by_the_next_batch(
    writer: SQLiteStorage,
    other: SQLiteStorage,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An older version's writer still running after an upgrade (no triggers, no notes),
    # a downgrade, an operator's INSERT: the writer's next batch that notes notes theirs
    # too, and says whose they are (the writer process's own hits wait: 1, then 4 and 5).
    monkeypatch.setattr(sqlite_storage, "_NOTE_HITS", 3)
    await store(writer, [hit(NOW, "a" * 32, "192.0.2.7")])
    await _insert_raw(other, hit(NOW + 1, "b" * 32, "192.0.2.8"))
    await _insert_raw(other, hit(NOW - 3 * HOUR_MS, "c" * 32, "192.0.2.9"))
    assert await noted(writer) != await truth(writer)
    await store(writer, [hit(NOW + 2, "a" * 32, "192.0.2.7"), hit(NOW + 3, "d" * 32, "192.0.2.7")])
    assert await noted(writer) == await truth(writer)
    assert "hits 2 to 3 were stored by another writer" in caplog.text
    assert (await erase(other, Subject("visitor", "c" * 32), SECRET, [])).hits == 1


async def test_hits_another_writer_stored_are_found_by_a_lookup_before_any_batch(
    writer: SQLiteStorage, sole: bool, other: SQLiteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    # An older version's writer still running: a lookup between its insert and our next
    # batch notes the hours first (erasure in a transaction, the IP lookup without one).
    await store(writer, [hit(NOW, "a" * 32, "192.0.2.7")])
    await _insert_raw(other, hit(NOW + 2 * HOUR_MS, "b" * 32, "192.0.2.8"))
    assert await subject_hours.ranges(writer, "ip", "?", ["192.0.2.8"]) == [
        ((NOW + 2 * HOUR_MS) // HOUR_MS * HOUR_MS, ((NOW + 2 * HOUR_MS) // HOUR_MS + 1) * HOUR_MS)
    ]
    await _insert_raw(other, hit(NOW + 3 * HOUR_MS, "c" * 32, "192.0.2.9"))
    assert (await erase(other, Subject("visitor", "c" * 32), SECRET, [])).hits == 1
    assert "hits 3 were stored by another writer" in caplog.text


async def test_hits_stored_while_the_store_was_closed_are_noted_when_it_opens(
    settings: Settings, writer: SQLiteStorage, sole: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long backlog is noted in several transactions (here of 2 ids each).
    monkeypatch.setattr(sqlite_storage, "_STRAYS_CHUNK", 2)
    await store(writer, [hit(NOW, "a" * 32, "192.0.2.7")])
    await writer.close()
    for i in range(5):
        row = hit(NOW + i * HOUR_MS, f"{i:032x}", f"192.0.2.{8 + i}")
        await _insert_raw(writer, row, closed=True)
    again = SQLiteStorage(settings)
    await again.open()
    try:
        assert await noted(again) == await truth(again)
        assert (await erase(again, Subject("ip", "192.0.2.12"), SECRET, [])).hits == 1
    finally:
        await again.close()


@pytest.mark.parametrize("deletion", ["erasure", "retention"])
async def test_ids_freed_by_deleting_the_newest_hits_are_watched_again(
    writer: SQLiteStorage, sole: bool, other: SQLiteStorage, settings: Settings, deletion: str
) -> None:
    # hits.id is reused once the newest rows are gone: a hit stored elsewhere under a
    # reused id must still be caught, so deletions lower the mark.
    old = NOW - 400 * DAY
    await store(writer, [hit(NOW - 3 * HOUR_MS, "a" * 32, "192.0.2.7")])
    await store(writer, [hit(old, "b" * 32, "192.0.2.8"), hit(old + 1, "b" * 32, "192.0.2.8")])
    if deletion == "erasure":
        assert (await erase(other, Subject("visitor", "b" * 32), SECRET, [])).hits == 2
    else:
        plan = await retention.plan(other, settings, now_ms=NOW)
        assert await retention.purge(other, plan, chunk_size=1) == 2
    await _insert_raw(other, hit(NOW, "c" * 32, "192.0.2.9"))  # id 2 again
    await store(writer, [hit(NOW + 1, "a" * 32, "192.0.2.7")])
    (visitors, ips), (all_visitors, all_ips) = await truth(writer), await noted(writer, lookup=sole)
    assert visitors <= all_visitors and ips <= all_ips  # an erased visitor's IP may stay
    assert (await erase(other, Subject("visitor", "c" * 32), SECRET, [])).hits == 1


@pytest.fixture
async def bulk_writer(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SQLiteStorage]:
    """The writer process's storage, noting hours once 5 hits wait (or after 10 minutes)."""
    monkeypatch.setattr(sqlite_storage, "_NOTE_HITS", 5)
    monkeypatch.setattr(sqlite_storage, "_NOTE_AGE_S", 600.0)
    async for storage in _opened(settings, sole=True):
        yield storage


def pair(n: int) -> list[HitRow]:
    return [hit(NOW + n, f"{n:032x}", f"192.0.2.{n}"), hit(NOW + n + 1, "", f"192.0.2.{n}")]


async def mark(storage: SQLiteStorage) -> int | None:
    row = await storage.fetch_one(subject_hours.NOTED_UP_TO)
    return None if row is None else int(row["value"])


async def test_the_writer_process_notes_hours_once_enough_hits_wait(
    bulk_writer: SQLiteStorage,
) -> None:
    await store(bulk_writer, pair(1))
    await store(bulk_writer, pair(2))
    assert await noted(bulk_writer) == (set(), set())  # 4 hits wait
    assert await mark(bulk_writer) == 0
    await store(bulk_writer, pair(3))
    assert await noted(bulk_writer) == await truth(bulk_writer) != (set(), set())
    assert await mark(bulk_writer) == 6
    assert await bulk_writer.fetch_one(subject_hours.PENDING_FROM) is None


async def test_hits_waiting_for_their_hours_are_found_by_every_lookup(
    bulk_writer: SQLiteStorage, other: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Erasure in another process, the IP lookup, a network block: each notes first.
    monkeypatch.setattr(sqlite_storage, "_NOTE_HITS", 100)
    await store(bulk_writer, [*pair(1), hit(NOW, "a" * 32, "203.0.113.5")])
    assert await noted(bulk_writer) == (set(), set())
    assert (await erase(other, Subject("visitor", f"{1:032x}"), SECRET, [])).hits == 1
    await store(bulk_writer, pair(2))
    assert ("192.0.2.2", NOW // HOUR_MS) not in (await noted(bulk_writer))[1]
    assert await subject_hours.ranges(other, "ip", "?", ["192.0.2.2"]) == [
        (NOW // HOUR_MS * HOUR_MS, (NOW // HOUR_MS + 1) * HOUR_MS)
    ]
    await store(bulk_writer, [hit(NOW + 9, "b" * 32, "203.0.113.9")])
    assert ("203.0.113.9", NOW // HOUR_MS) not in (await noted(bulk_writer))[1]
    target = Target.parse(network="203.0.113.0/24")
    block = await blocking.add(other, target, "fraud check", "dpo", [])
    members = await other.fetch_all(
        "SELECT ip FROM block_ips WHERE block_id = ? ORDER BY ip", [block["id"]]
    )
    assert [r["ip"] for r in members] == ["203.0.113.5", "203.0.113.9"]


async def test_the_writer_process_notes_what_waits_when_its_first_batch_is_old_enough(
    bulk_writer: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store(bulk_writer, pair(1))
    monkeypatch.setattr(sqlite_storage, "_NOTE_AGE_S", 0.0)
    await store(bulk_writer, pair(2))  # 4 hits, but the first 2 waited long enough
    assert await noted(bulk_writer) == await truth(bulk_writer) != (set(), set())


async def test_the_writer_process_notes_what_waits_when_it_closes(
    bulk_writer: SQLiteStorage, settings: Settings
) -> None:
    await store(bulk_writer, pair(1))
    assert await noted(bulk_writer) == (set(), set())
    await bulk_writer.close()
    with contextlib.closing(connect(bulk_writer.path)) as conn:
        visitors = conn.execute("SELECT visitor_id, hour FROM visitor_hours").fetchall()
        assert visitors == [(f"{1:032x}", NOW // HOUR_MS)]
        assert conn.execute(subject_hours.NOTED_UP_TO).fetchall() == [(2,)]
        assert conn.execute(subject_hours.PENDING_FROM).fetchall() == []


async def test_a_due_note_covers_ids_a_hand_made_delete_freed_below_the_waiting_ones(
    bulk_writer: SQLiteStorage, other: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer's own waiting ids come out of order (3, then 2 again): its note must
    # start below the lowest, or id 2 would pass under the mark for good.
    monkeypatch.setattr(sqlite_storage, "_NOTE_HITS", 2)
    await store(bulk_writer, pair(1))  # noted: mark 2
    await store(bulk_writer, [hit(NOW + 5, "a" * 32, "192.0.2.50")])  # id 3 waits
    await other.execute("DELETE FROM hits WHERE id > 1")
    await store(bulk_writer, [hit(NOW + 7, "c" * 32, "192.0.2.77")])  # id 2: due
    assert ("c" * 32, NOW // HOUR_MS) in (await noted(bulk_writer))[0]
    assert (await erase(other, Subject("visitor", "c" * 32), SECRET, [])).hits == 1


async def test_waiting_hits_under_ids_a_hand_made_delete_freed_are_found(
    bulk_writer: SQLiteStorage, other: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The newest hits deleted by hand, below the mark a lookup left and the first id that
    # was waiting: the next batch's hits get ids below both, and lookups still find them.
    monkeypatch.setattr(sqlite_storage, "_NOTE_HITS", 100)
    await store(bulk_writer, pair(1))
    await subject_hours.catch_up(other)  # mark 2
    await store(bulk_writer, pair(3))  # ids 3 and 4 wait
    await other.execute("DELETE FROM hits WHERE id > 1")
    await store(bulk_writer, [hit(NOW + 7, "c" * 32, "192.0.2.77")])  # id 2 again
    assert (await erase(other, Subject("visitor", "c" * 32), SECRET, [])).hits == 1


async def _insert_raw(storage: SQLiteStorage, row: HitRow, *, closed: bool = False) -> None:
    """A hit stored by plain SQL, as no code of ours does."""
    sql = f"INSERT INTO hits ({', '.join(HitRow._fields)}) VALUES ({', '.join('?' * len(row))})"
    if closed:
        with contextlib.closing(connect(storage.path)) as conn, conn:
            conn.execute(sql, tuple(row))
        return
    await storage.execute(sql, list(row))


async def test_a_store_written_by_a_newer_collector_is_refused(
    settings: Settings, writer: SQLiteStorage, sole: bool
) -> None:
    # An older collector would store hits without noting their hours (its schema
    # expects the triggers that 0016 dropped), or worse: it must not write there at all.
    await writer.execute("INSERT INTO schema_version VALUES (9999, 'future', datetime('now'))")
    await writer.close()
    with pytest.raises(StorageError, match="schema version 9999, newer than this collector"):
        await SQLiteStorage(settings).open()


_INSERT_INTO_HITS = re.compile(r"\b(INSERT|REPLACE)\b[^;]*?\bINTO\s+hits\b", re.I | re.S)


def test_only_the_batch_writer_inserts_hits() -> None:
    # Without triggers, hits that another code path inserted on SQLite would have no hours
    # noted until the writer's next batch or open, and erasure would miss them meanwhile.
    # PostgreSQL keeps its triggers (COPY, any node).
    found = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if _INSERT_INTO_HITS.search(path.read_text(encoding="utf-8"))
    )
    assert found == ["storage/sqlite_inserts.py"]
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.stem != "sqlite_inserts" and "sqlite_inserts" in path.read_text(encoding="utf-8")
    )
    assert users == ["storage/sqlite.py"]  # its batch writer, which notes the hours
