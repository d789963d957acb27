"""The SQLite store: schema migrations, private files, atomic batches."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from collector.config import Settings
from collector.errors import StorageError
from collector.storage import open_storage
from collector.storage.base import Batch, HitRow
from tests.conftest import make_settings, rows


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


async def test_schema_is_migrated_once_and_file_is_private(sqlite_settings: Settings) -> None:
    for _ in range(2):
        storage = open_storage(sqlite_settings)
        await storage.open()
        assert await storage.schema_version() >= 1
        await storage.close()
        await storage.close()  # safe twice
    db = Path(sqlite_settings.storage.path)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    versions = rows(db, "SELECT version FROM schema_version")
    assert len(versions) == len({r[0] for r in versions})
    assert rows(db, "PRAGMA journal_mode")[0][0] == "wal"


async def test_batch_is_all_or_nothing(sqlite_settings: Settings) -> None:
    storage = open_storage(sqlite_settings)
    await storage.open()
    await storage.write_batch(
        Batch(hits=[sample_row()], pixel_counts={("2026-01-01", "/", "absent"): 2})
    )
    with pytest.raises(StorageError):
        # the second row violates NOT NULL: the first must not be stored either
        await storage.write_batch(Batch(hits=[sample_row(ts_ms=2), sample_row(ip=None)]))
    await storage.write_batch(Batch(pixel_counts={("2026-01-01", "/", "absent"): 3}))
    await storage.close()
    db = Path(sqlite_settings.storage.path)
    assert [r[0] for r in rows(db, "SELECT ts_ms FROM hits")] == [1]
    assert rows(db, "SELECT hits FROM pixel_counts")[0][0] == 5


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, storage={"path": str(tmp_path / "nope" / "c.db")})
    with pytest.raises(StorageError, match="does not exist"):
        await open_storage(settings).open()
