"""The storage contract on every backend: migrations, atomic batches, generic access.

Each test taking ``backend_settings`` runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from collector.aggregates import aggregators
from collector.config import Settings
from collector.errors import StorageError
from collector.storage import open_storage
from collector.storage.base import Batch, HitRow
from collector.storage.spool import SpoolFile
from collector.storage.sqlite_inserts import hit_inserts
from collector.subjects import Subject, erase
from tests.conftest import SECRET, make_settings, rows


def sample_row(**kw: object) -> HitRow:
    base = dict(
        ts_ms=1,
        ip="192.0.2.1",
        visitor_id="v" * 32,
        session_id="s" * 32,
        cookies=None,
        user_agent="ua",
        browser_family="Chrome",
        browser_version="1",
        os_family="Linux",
        os_version="",
        device_family="Other",
        device_brand="",
        device_class="pc",
        page_url="https://s.kz/",
        referrer_url=None,
        placement_id=None,
        country=None,
        region=None,
        city=None,
        consent_id="c" * 16,
        policy_version="1",
        source="web",
    )
    base.update(kw)
    return HitRow(**base)  # type: ignore[arg-type]


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


async def test_schema_is_migrated_once(backend_settings: Settings) -> None:
    for _ in range(2):
        storage = open_storage(backend_settings)
        await storage.open()
        assert await storage.schema_version() >= 4
        versions = await storage.fetch_all("SELECT version, name FROM schema_version")
        await storage.close()
        await storage.close()  # safe twice
    assert len(versions) == len({r["version"] for r in versions})
    assert {(1, "core"), (2, "auth_audit"), (4, "blocks")} <= {
        (r["version"], r["name"]) for r in versions
    }


async def test_sqlite_file_is_private_and_in_wal_mode(sqlite_settings: Settings) -> None:
    storage = open_storage(sqlite_settings)
    await storage.open()
    assert await _checkpoint_pages(storage) == 2_560  # 40 MiB of WAL
    await storage.close()
    db = Path(sqlite_settings.storage.path)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert rows(db, "PRAGMA journal_mode")[0][0] == "wal"
    assert rows(db, "PRAGMA page_size")[0][0] == 16_384


async def test_a_file_made_with_other_pages_keeps_them_and_stores(
    sqlite_settings: Settings,
) -> None:
    # Stores created before 16 KiB pages (or by hand) open as they are.
    db = Path(sqlite_settings.storage.path)
    with contextlib.closing(sqlite3.connect(db)) as made:
        made.execute("PRAGMA page_size = 4096")
        made.execute("PRAGMA journal_mode = WAL")
    storage = open_storage(sqlite_settings)
    await storage.open()
    try:
        await storage.write_batch(Batch(hits=[sample_row(), sample_row(ts_ms=2)]))
        assert (await storage.fetch_one("SELECT count(*) AS n FROM hits")) == {"n": 2}
        assert await _checkpoint_pages(storage) == 10_240  # 40 MiB of WAL, as with 16 KiB
    finally:
        await storage.close()
    assert rows(db, "PRAGMA page_size")[0][0] == 4096


async def _checkpoint_pages(storage: Any) -> int:
    async with storage.writer.execute("PRAGMA wal_autocheckpoint") as cur:
        row = await cur.fetchone()
    return int(row[0])


async def test_batch_is_all_or_nothing(backend_settings: Settings) -> None:
    storage = open_storage(backend_settings)
    await storage.open()
    try:
        await storage.write_batch(
            Batch(hits=[sample_row()], pixel_counts={("2026-01-01", "/", "absent"): 2})
        )
        with pytest.raises(StorageError):
            # the second row violates NOT NULL: the first must not be stored either
            await storage.write_batch(Batch(hits=[sample_row(ts_ms=2), sample_row(ip=None)]))
        await storage.write_batch(Batch(pixel_counts={("2026-01-01", "/", "absent"): 3}))
        assert await storage.fetch_all("SELECT ts_ms FROM hits") == [{"ts_ms": 1}]
        assert await storage.fetch_one("SELECT hits FROM pixel_counts") == {"hits": 5}
    finally:
        await storage.close()


async def test_pixel_and_app_hits_in_one_batch_keep_every_column(
    backend_settings: Settings,
) -> None:
    # SQLite inserts pixel hits through a narrower statement: the app columns must still
    # be NULL for them and exact for app events, whatever the mix of a batch.
    pixel = [sample_row(ts_ms=t, ip=f"192.0.2.{t}") for t in (1, 3)]
    app = [
        sample_row(
            ts_ms=t, source="app", event_id=f"e{t}", event_type="screen_view",
            client_ts_ms=t - 1, received_ms=t + 1, time_flag="stale", app_version="2.1",
            device_model="iPhone14,2",
        )
        for t in (2, 4)
    ]  # fmt: skip
    partial = sample_row(ts_ms=5, event_type="page_view")  # one app column set
    storage = open_storage(backend_settings)
    await storage.open()
    try:
        await storage.write_batch(Batch(hits=pixel))
        await storage.write_batch(Batch(hits=[pixel[0], app[0], pixel[1], app[1], partial]))
        cols = ", ".join(HitRow._fields)
        stored = [
            HitRow(**r)
            for r in await storage.fetch_all(f"SELECT {cols} FROM hits ORDER BY ts_ms, id")
        ]
        assert stored == sorted([*pixel, *pixel, *app, partial], key=lambda h: h.ts_ms)
    finally:
        await storage.close()


async def test_columns_null_in_a_whole_batch_read_back_null_and_others_exact(
    backend_settings: Settings,
) -> None:
    # SQLite leaves a column that is NULL in every hit of a batch out of its INSERT: it
    # must read back NULL, and a column NULL in only some hits must keep the others' values.
    bare = [sample_row(ts_ms=t) for t in (1, 2)]
    mixed = [  # cookies, placement and country NULL throughout: left out
        sample_row(ts_ms=3, referrer_url="https://ref.example/", region="Almaty"),
        sample_row(ts_ms=4, city="Almaty"),
        sample_row(ts_ms=5),
    ]
    full = [
        sample_row(ts_ms=6, cookies='{"ab":"1"}', placement_id="banner-1", country="KZ"),
        sample_row(ts_ms=7, referrer_url="https://ref.example/", region="Almaty", city="A"),
    ]
    storage = open_storage(backend_settings)
    await storage.open()
    try:
        for batch in (bare, mixed, full):
            await storage.write_batch(Batch(hits=batch))
        cols = ", ".join(HitRow._fields)
        stored = await storage.fetch_all(f"SELECT {cols} FROM hits ORDER BY ts_ms")
        assert [HitRow(**r) for r in stored] == [*bare, *mixed, *full]
    finally:
        await storage.close()


async def test_a_hit_without_a_source_fails_instead_of_taking_the_default(
    backend_settings: Settings,
) -> None:
    # ``source`` has a default ('web'): a batch whose hits all lack it must still fail its
    # NOT NULL, as a row with a missing value anywhere else does, and store nothing.
    storage = open_storage(backend_settings)
    await storage.open()
    try:
        with pytest.raises(StorageError):
            await storage.write_batch(Batch(hits=[sample_row(source=None)]))
        assert await storage.fetch_all("SELECT id FROM hits") == []
    finally:
        await storage.close()


def test_sqlite_binds_no_parameter_for_columns_null_in_every_hit() -> None:
    # Each NULL bound costs ~700 instructions a hit in Python 3.11's sqlite3; leaving
    # columns out pays from three of them on (sqlite_inserts.py).
    def bound(hits: list[HitRow]) -> list[str]:
        [(sql, values)] = hit_inserts(hits)
        columns = sql.split("(", 1)[1].split(")", 1)[0].split(", ")
        assert {len(v) for v in values} == {len(columns)}
        return columns

    bare = bound([sample_row(ts_ms=1), sample_row(ts_ms=2)])
    for column in ("cookies", "referrer_url", "placement_id", "country", "event_id"):
        assert column not in bare
    assert {"ts_ms", "ip", "page_url", "source"} <= set(bare)
    some = [sample_row(ts_ms=1), sample_row(ts_ms=2, country="KZ")]
    assert "country" in bound(some) and "city" not in bound(some)
    [(_, values)] = hit_inserts(some)
    assert values[1][bound(some).index("country")] == "KZ"
    # Three NULL columns are left out; two (cookies, placement) are bound.
    pixel_columns = list(HitRow._fields[: HitRow._fields.index("event_id")])
    geo = dict(referrer_url="https://ref.example/", country="KZ", region="A")
    assert bound([sample_row(ts_ms=1, **geo)]) == [
        c for c in pixel_columns if c not in ("cookies", "placement_id", "city")
    ]
    assert bound([sample_row(ts_ms=1, city="A", **geo)]) == pixel_columns


async def test_generic_access_is_portable(backend_settings: Settings) -> None:
    storage = open_storage(backend_settings)
    await storage.open()
    try:
        await storage.write_batch(
            Batch(hits=[sample_row(ts_ms=t, ip=f"192.0.2.{t % 3}") for t in range(1, 11)])
        )
        by_ip = await storage.fetch_all(
            # sum() of BIGINT is NUMERIC in PostgreSQL: cast it so '/' divides integers on both
            "SELECT ip, count(*) AS n, sum(ts_ms) AS total, "
            "CAST(sum(ts_ms) AS BIGINT) / count(*) AS mean "
            "FROM hits WHERE ts_ms > ? GROUP BY ip ORDER BY ip",
            [0],
        )
        # sum() is NUMERIC in PostgreSQL; callers get plain ints on both backends
        assert by_ip == [
            {"ip": "192.0.2.0", "n": 3, "total": 18, "mean": 6},
            {"ip": "192.0.2.1", "n": 4, "total": 22, "mean": 5},
            {"ip": "192.0.2.2", "n": 3, "total": 15, "mean": 5},
        ]
        assert all(type(v) is int for r in by_ip for k, v in r.items() if k != "ip")
        assert await storage.fetch_one("SELECT ip FROM hits WHERE ts_ms = ?", [99]) is None
        touched = await storage.execute(
            "UPDATE hits SET city = ? WHERE ip = ? AND ts_ms <= ?", ["Almaty", "192.0.2.1", 7]
        )
        assert touched == 3
        async with storage.transaction() as tx:
            await tx.executemany(
                "INSERT INTO blocks (kind, value, reason, created_at, created_by) "
                "VALUES (?, ?, 'check', ?, 'test')",
                [("ip", "192.0.2.1", 1), ("visitor", "v", 2)],
            )
            assert (await tx.fetch_one("SELECT count(*) AS n FROM blocks"))["n"] == 2  # type: ignore[index]
        with pytest.raises(RuntimeError):
            async with storage.transaction() as tx:
                await tx.execute("DELETE FROM blocks")
                raise RuntimeError("rolled back")
        assert len(await storage.fetch_all("SELECT id FROM blocks")) == 2
    finally:
        await storage.close()


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, storage={"path": str(tmp_path / "nope" / "c.db")})
    with pytest.raises(StorageError, match="does not exist"):
        await open_storage(settings).open()


async def test_hits_keep_only_the_indexes_a_query_uses(sqlite_settings: Settings) -> None:
    # Every index on hits costs each stored row (issue 8): only time ranges have one
    # (retention, rebuilds, breach report, a subject's hours). A visitor id or an IP is
    # found through visitor_hours or ip_hours, which the writer fills; source is a rollup
    # dimension. None of them has an index. The time index carries both ids, so that a
    # subject's hours are scanned without reading every row in them.
    storage = open_storage(sqlite_settings)
    await storage.open()
    try:
        found = await storage.fetch_all(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'hits' "
            "AND sql IS NOT NULL ORDER BY name"
        )
        columns = await storage.fetch_all("SELECT name FROM pragma_index_info('hits_ts')")
    finally:
        await storage.close()
    assert [r["name"] for r in found] == ["hits_ts"]
    assert [r["name"] for r in columns] == ["ts_ms", "ip", "visitor_id"]


@pytest.mark.parametrize("in_use_before", [False, True])
def test_sqlite_memory_statistics_go_off_only_while_nothing_uses_sqlite(
    in_use_before: bool,
) -> None:
    # Off, each of SQLite's allocations skips a global mutex (driver.py); the switch
    # restarts the library, which must never happen under an open connection.
    code = f"""
import ctypes, sqlite3
held = sqlite3.connect(":memory:") if {in_use_before} else None
from collector.storage import driver
conn = driver.connect(":memory:")
conn.execute("CREATE TABLE t (x)")
conn.execute("INSERT INTO t VALUES ('kept')")
path = next(l.split()[-1] for l in open("/proc/self/maps") if "/libsqlite3.so" in l)
lib = ctypes.CDLL(path)
lib.sqlite3_memory_used.restype = ctypes.c_int64
kept = conn.execute("SELECT x FROM t").fetchone()[0]
print(driver.MEMORY_STATISTICS_OFF, lib.sqlite3_memory_used() > 0, kept)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == (["False", "True", "kept"] if in_use_before else ["True", "False", "kept"])


def test_the_package_opens_sqlite_files_only_through_the_driver() -> None:
    # driver.connect turns secure_delete on; aiosqlite.connect and sqlite3.connect
    # would open a file without it on builds whose default is off.
    root = Path(__file__).resolve().parent.parent / "collector"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "storage" / "driver.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            opens = (
                isinstance(node, ast.Attribute)
                and node.attr == "connect"
                and isinstance(node.value, ast.Name)
                and node.value.id in ("sqlite3", "aiosqlite")
            ) or (
                isinstance(node, ast.ImportFrom)
                and node.module in ("sqlite3", "aiosqlite")
                and any(alias.name == "connect" for alias in node.names)
            )
            if opens:
                offenders.append(f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}")
    assert offenders == []


async def test_an_erased_hit_leaves_no_copy_in_the_file(sqlite_settings: Settings) -> None:
    # Deleted rows are overwritten with zeros (secure_delete), not left in free space
    # where a copy of the file, a backup, would still hold them.
    marker = "erase-me-4b1d3f"
    subject = "e" * 32
    hits = [sample_row(ts_ms=1_000 + i, visitor_id=f"{i:032x}") for i in range(200)]
    hits[77] = sample_row(ts_ms=1_077, visitor_id=subject, cookies=f'{{"c":"{marker}"}}')
    storage = open_storage(sqlite_settings, aggregators(sqlite_settings))
    await storage.open()
    try:
        await storage.write_batch(Batch(hits=hits))
        erased = await erase(storage, Subject("visitor", subject), SECRET, [])
        # As soon as the erasure returns, with the store still open: not in the file,
        # not in the WAL.
        db = Path(sqlite_settings.storage.path)
        for path in db.parent.glob(db.name + "*"):
            assert marker.encode() not in path.read_bytes(), path.name
    finally:
        await storage.close()
    assert erased.hits == 1
    assert len(rows(db, "SELECT 1 FROM hits")) == 199


def test_a_delivered_batch_leaves_no_copy_in_the_spool_file(tmp_path: Path) -> None:
    # Spooled hits are personal data; once delivered they are overwritten with zeros,
    # not left in the file's free space (secure_delete, collector/storage/driver.py).
    marker = "spooled-4b1d3f"
    hit = sample_row(cookies=f'{{"c":"{marker}"}}')
    spool = SpoolFile.create(tmp_path)
    try:
        row_id = spool.append(Batch(hits=[hit] * 50))
        spool.remove(row_id, 50)
        spool._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        spool.close(delete_if_empty=False)
    files = list(tmp_path.glob("spool-*"))
    assert files and all(marker.encode() not in p.read_bytes() for p in files)


async def test_every_connection_turns_secure_delete_on_where_the_default_is_off(
    sqlite_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Debian's libsqlite3 has it on by default, so the two tests above would pass here
    # without the driver's pragma; a library whose default is off is what it is for.
    real = sqlite3.connect

    def off_by_default(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real(*args, **kwargs)
        conn.execute("PRAGMA secure_delete = OFF")
        return conn

    monkeypatch.setattr(sqlite3, "connect", off_by_default)
    storage = open_storage(sqlite_settings)
    await storage.open()
    try:
        read = await storage.fetch_all("PRAGMA secure_delete")
        async with storage.writer.execute("PRAGMA secure_delete") as cur:  # type: ignore[attr-defined]
            write = await cur.fetchone()
    finally:
        await storage.close()
    spool = SpoolFile.create(tmp_path)
    try:
        spooled = spool._db.execute("PRAGMA secure_delete").fetchone()
    finally:
        spool.close(delete_if_empty=True)
    assert [read[0]["secure_delete"], write[0], spooled[0]] == [1, 1, 1]


async def test_a_reader_holding_the_checkpoint_back_costs_a_short_wait_and_a_warning(
    sqlite_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # The TRUNCATE checkpoint holds the write lock while it waits for readers, so it
    # waits in short attempts (writers get in between), never the 5-s busy timeout.
    storage = open_storage(sqlite_settings)
    await storage.open()
    reader = sqlite3.connect(sqlite_settings.storage.path, isolation_level=None)
    try:
        await storage.write_batch(Batch(hits=[sample_row(ts_ms=1_000 + i) for i in range(50)]))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM hits").fetchone()  # a snapshot held open
        await storage.execute("DELETE FROM hits WHERE ts_ms < ?", [1_010])
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            settled = await storage.settle_deletes()
        waited = time.monotonic() - started
        assert not settled and waited < 4
        assert "could not complete" in caplog.text
        reader.execute("COMMIT")
        assert await storage.settle_deletes()
    finally:
        reader.close()
        await storage.close()
