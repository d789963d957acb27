"""Governance against real ``collector serve`` processes and the real CLI: blocks reach
every worker within a second (6.2.4), backups under load are consistent and restore
brings data back (5.5), secrets stay out of logs and personal files are 0600."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from click.testing import CliRunner

from collector.cli import main
from collector.config import Settings, load_settings
from collector.storage.base import Batch, HitRow
from collector.storage.sqlite import SQLiteStorage
from tests.conftest import SECRET, Server, rows
from tests.test_server import cookie_for

pytestmark = pytest.mark.slow

ALICE = "a" * 32
BOB = "b" * 32


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _env(tmp_path: Path, env: dict[str, str] | None) -> dict[str, str]:
    return {
        "COLLECTOR_STORAGE_PATH": str(tmp_path / "collector.db"),
        "COLLECTOR_CONSENT_SECRET": SECRET,
        **(env or {}),
    }


def cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Ran:
    """The real ``collector`` command, in this process (a fresh interpreter costs ~0.5 s)."""
    done = CliRunner().invoke(main, list(args), env=_env(tmp_path, env))
    if done.exception and not isinstance(done.exception, SystemExit):
        raise done.exception
    return Ran(done.exit_code, done.stdout, done.stderr)


def cli_process(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Ran:
    """The ``collector`` command as its own process, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, **_env(tmp_path, env)},
    )
    return Ran(done.returncode, done.stdout, done.stderr)


async def _write(settings: Settings, hits: list[HitRow]) -> None:
    storage = SQLiteStorage(settings)
    await storage.open()
    try:
        await storage.write_batch(Batch(hits=hits))
    finally:
        await storage.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def count(db: Path, sql: str, params: tuple[object, ...] = ()) -> int:
    return int(rows(db, sql, params)[0][0])


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def send(url: str, visitor: str, n: int) -> None:
    """n consented hits, each on a new connection so that every worker gets some."""
    cookie = f"{cookie_for()}; kdv_vid={visitor}"
    for _ in range(n):
        assert httpx.get(f"{url}/p.gif", headers={"cookie": cookie}).status_code == 200


def test_a_block_stops_recording_on_every_worker_within_a_second(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    db = tmp_path / "collector.db"
    token = cli(tmp_path, "token", "create", "--role", "admin", "--name", "dpo").stdout.strip()
    server = serve(args=["--workers", "2"])
    send(server.url, ALICE, 6)
    send(server.url, BOB, 2)
    wait_for(lambda: count(db, "SELECT count(*) FROM hits") == 8)

    made = httpx.post(
        f"{server.url}/api/admin/blocks",
        json={"visitor": ALICE, "reason": "subject request 2026-17"},
        headers={"authorization": f"Bearer {token}"},
    )
    assert made.status_code == 201, made.text
    # Both workers refresh every 0.25 s; 0.75 s leaves room for a loaded CI machine and
    # still proves the one-second promise.
    time.sleep(0.75)
    send(server.url, ALICE, 20)
    send(server.url, BOB, 2)
    wait_for(lambda: count(db, "SELECT count(*) FROM hits WHERE visitor_id = ?", (BOB,)) == 4)
    time.sleep(0.2)  # a flush interval more for anything still queued
    assert count(db, "SELECT count(*) FROM hits WHERE visitor_id = ?", (ALICE,)) == 6

    # The same through the CLI against the running server: the block is released, and
    # recording resumes without a restart.
    listed = cli(tmp_path, "blocks")
    assert ALICE in listed.stdout and "subject request 2026-17" in listed.stdout
    released = cli(tmp_path, "unblock", "--visitor", ALICE)
    assert released.returncode == 0, released.stderr
    time.sleep(0.3)
    send(server.url, ALICE, 4)
    wait_for(lambda: count(db, "SELECT count(*) FROM hits WHERE visitor_id = ?", (ALICE,)) == 10)
    server.stop()
    assert SECRET not in server.log.read_text() and token not in server.log.read_text()


async def _load(url: str, stop: asyncio.Event) -> int:
    sent = 0
    async with httpx.AsyncClient(base_url=url, headers={"cookie": cookie_for()}) as client:
        while not stop.is_set():
            if (
                await client.get("/p.gif", params={"u": f"https://s.kz/{sent}"})
            ).status_code == 200:
                sent += 1
    return sent


async def test_backup_under_load_is_consistent_and_restore_brings_back_a_deleted_row(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    db = tmp_path / "collector.db"

    async def run(*args: str) -> Ran:  # the CLI's own asyncio.run needs a thread here
        return await asyncio.to_thread(cli, tmp_path, *args)

    server = serve()
    for name in ("collector.db", "collector.db-wal", "collector.db-shm", "collector.db.lock"):
        assert mode(tmp_path / name) == 0o600, name
    stop = asyncio.Event()
    load = [asyncio.create_task(_load(server.url, stop)) for _ in range(8)]
    # Back up once hits are really being written (a loaded machine starts slowly).
    deadline = time.monotonic() + 30
    while count(db, "SELECT count(*) FROM hits") < 50 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    backup = tmp_path / "backups" / "b1.db"
    backup.parent.mkdir()
    made = await asyncio.to_thread(cli_process, tmp_path, "backup", str(backup))
    await asyncio.sleep(0.3)
    stop.set()
    sent = sum(await asyncio.gather(*load))
    assert made.returncode == 0, made.stderr
    print(made.stdout.strip(), f"(under load: {sent} hits sent)")
    assert "integrity ok" in made.stdout
    assert mode(backup) == 0o600
    check = sqlite3.connect(backup)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    in_backup = check.execute("SELECT count(*) FROM hits").fetchone()[0]
    check.close()
    assert in_backup > 0
    again = await run("backup", str(backup))
    assert again.returncode == 1 and "exists already" in again.stderr

    refused = await run("restore", str(backup))
    assert refused.returncode == 1 and "in use by a running collector server" in refused.stderr
    server.stop()
    total = count(db, "SELECT count(*) FROM hits")
    assert in_backup <= total == sent

    # Damage: a row is deleted (say by unauthorised access); the backup restores it.
    first = rows(db, "SELECT id, page_url FROM hits ORDER BY id LIMIT 1")[0]
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM hits WHERE id = ?", (first["id"],))
    conn.commit()
    conn.close()
    restored = await run("restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert (
        rows(db, "SELECT page_url FROM hits WHERE id = ?", (first["id"],))[0][0]
        == (first["page_url"])
    )
    assert count(db, "SELECT count(*) FROM hits") == in_backup
    (aside,) = tmp_path.glob("collector.db.replaced-*[0-9]Z")
    assert mode(aside) == mode(db) == 0o600
    assert count(aside, "SELECT count(*) FROM hits") == total - 1  # kept, not lost
    log = (await run("audit", "list", "--action", "backup.restore")).stdout
    assert "backup.restore" in log and "ok" in log
    assert (await run("audit", "verify")).returncode == 0

    not_ours = tmp_path / "other.db"
    sqlite3.connect(not_ours).execute("CREATE TABLE t (x)").connection.close()
    bad = await run("restore", str(not_ours))
    assert bad.returncode == 1 and "not a collector database" in bad.stderr


def test_cli_subject_requests_breach_report_and_purge_are_audited(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    assert cli(tmp_path, "audit", "verify").returncode == 0  # creates the database
    now = int(time.time() * 1000)
    # Through the batch writer, the only code that inserts hits (it notes their hours).
    hits = [
        HitRow(ts, ip, vid, "s", None, "ua", "b", "1", "o", "1", "d", "x", "desktop",
               None, None, None, None, None, None, f"c-{vid[:1]}", "1", "web")
        for ts, ip, vid in [(now, "81.2.69.142", ALICE), (now - 400 * 86_400_000, "10.0.0.1", BOB)]
    ]  # fmt: skip
    asyncio.run(_write(load_settings(None, environ=_env(tmp_path, None)), hits))

    out = tmp_path / "alice.json"
    exported = cli(tmp_path, "export", "--visitor", ALICE, "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    assert mode(out) == 0o600 and json.loads(out.read_text())["hits"][0]["ip"] == "81.2.69.142"
    both = cli(tmp_path, "export", "--visitor", ALICE, "--ip", "1.2.3.4")
    assert both.returncode == 2 and "exactly one subject" in both.stderr

    day = time.strftime("%Y-%m-%d", time.gmtime(now / 1000))
    report = cli(
        tmp_path, "incident", "--from", day, "--to", f"{day}T23:59:59.999", "--format", "json"
    )
    assert json.loads(report.stdout)["consent_ids"] == ["c-a"]
    table = cli(tmp_path, "incident", "--from", "2000-01-01", "--to", "2100-01-01",
                "--ip-range", "10.0.0.0/8").stdout  # fmt: skip
    assert BOB in table and ALICE not in table and "1 visitors, 1 consent ids" in table

    dry = cli(tmp_path, "purge", "--dry-run")
    assert "would delete 1 hits older than 365 days" in dry.stdout
    purged = cli(tmp_path, "purge")
    assert purged.returncode == 0 and "deleted 1 hits" in purged.stdout
    assert count(db, "SELECT count(*) FROM hits") == 1

    erased = cli(tmp_path, "erase", "--visitor", ALICE, "--yes")
    assert erased.returncode == 0 and "erased 1 hits" in erased.stdout
    assert count(db, "SELECT count(*) FROM hits") == 0
    blocked = cli(tmp_path, "block", "--ip", "10.0.0.1", "--reason", "authority check")
    assert blocked.returncode == 0 and "blocked ip 10.0.0.1" in blocked.stdout

    actions = [r[0] for r in rows(db, "SELECT action FROM audit_log ORDER BY id")]
    for action in ("subject.export", "incident.report", "retention.run", "subject.erase",
                   "block.add"):  # fmt: skip
        assert action in actions
    assert cli(tmp_path, "audit", "verify").returncode == 0
    # An edited audit row is detected.
    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit_log SET subject = '1.1.1.1' WHERE action = 'block.add'")
    conn.commit()
    conn.close()
    broken = cli(tmp_path, "audit", "verify")
    assert broken.returncode == 1 and "record altered" in broken.stderr
