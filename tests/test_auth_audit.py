"""Access rules and the audit trail (5.5): roles, hashed tokens, a chain that shows tampering."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from collector.app import CollectorApp
from tests.conftest import SECRET


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_roles_decide_what_a_token_may_read(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    analyst = await app.tokens.create("ana", "analyst")
    admin = await app.tokens.create("root", "admin")
    assert (await client.get("/api/whoami", headers=bearer(analyst))).json() == {
        "name": "ana",
        "role": "analyst",
    }
    denied = await client.get("/api/audit", headers=bearer(analyst))
    assert denied.status_code == 403 and denied.json()["error"] == "forbidden"
    missing = await client.get("/api/audit")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in missing.json()["detail"]
    ok = await client.get("/api/audit", headers=bearer(admin))
    assert ok.status_code == 200
    actions = [e["action"] for e in ok.json()["items"]]
    assert actions[:3] == ["auth.failed", "audit.read", "whoami"]
    assert "server.start" in actions


async def test_tokens_are_stored_hashed_and_revocable(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    app, client = backend_app, backend_client
    token = await app.tokens.create("eng", "engineer")
    assert token.startswith("kdv_") and len(token) > 40
    if app.settings.storage.backend == "sqlite":
        raw = b"".join(p.read_bytes() for p in Path(app.settings.storage.path).parent.glob("*.db*"))
        assert token.encode() not in raw
    assert not await app.storage.fetch_all(
        "SELECT id FROM api_tokens WHERE token_hash = ? OR prefix = ?", [token, token]
    )
    assert (await client.get("/api/whoami", headers=bearer(token))).status_code == 200
    await app.tokens.revoke("eng")
    assert (await client.get("/api/whoami", headers=bearer(token))).status_code == 401


async def test_repeated_failures_are_rate_limited_and_logged(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    app, client = backend_app, backend_client
    statuses = [
        (await client.get("/api/whoami", headers=bearer(f"kdv_wrong{i}"))).status_code
        for i in range(12)
    ]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    assert any("unauthorised access attempt" in r.message for r in caplog.records)
    assert "kdv_wrong" not in caplog.text  # presented tokens never reach the log
    assert "collector_auth_failures_total 10.0" in (await client.get("/metrics")).text
    failed = await app.storage.fetch_one(
        "SELECT count(*) AS n FROM audit_log WHERE action = 'auth.failed'"
    )
    assert failed == {"n": 10}


async def test_server_start_is_audited_without_secrets(backend_app: CollectorApp) -> None:
    app = backend_app
    (start,) = await app.audit.entries(action="server.start")
    assert start["actor"] == "system"
    assert '"secret": "***"' in start["detail"] and SECRET not in start["detail"]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "COLLECTOR_STORAGE_PATH": str(tmp_path / "collector.db"),
        "COLLECTOR_CONSENT_SECRET": SECRET,
    }
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )


def test_cli_tokens_and_a_tampered_audit_row_is_detected(tmp_path: Path) -> None:
    created = cli(tmp_path, "token", "create", "--role", "analyst", "--name", "ana")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("kdv_")
    listing = cli(tmp_path, "token", "list").stdout
    assert "ana" in listing and "analyst" in listing and token not in listing
    dup = cli(tmp_path, "token", "create", "--role", "admin", "--name", "ana")
    assert dup.returncode == 1 and dup.stderr.count("\n") == 1 and "exists already" in dup.stderr
    assert cli(tmp_path, "token", "revoke", "ana").returncode == 0
    assert cli(tmp_path, "token", "revoke", "ana").returncode == 1
    ok = cli(tmp_path, "audit", "verify")
    assert ok.returncode == 0 and "intact: 4 records" in ok.stdout
    assert "token.create" in cli(tmp_path, "audit", "list").stdout

    conn = sqlite3.connect(tmp_path / "collector.db")
    conn.execute("UPDATE audit_log SET subject = 'someone-else' WHERE id = 2")
    conn.commit()
    conn.close()
    broken = cli(tmp_path, "audit", "verify")
    assert broken.returncode == 1
    assert "broken at record 2: record altered" in broken.stderr


async def test_deleting_an_audit_row_breaks_the_chain(backend_app: CollectorApp) -> None:
    app = backend_app
    for i in range(3):
        await app.audit.record(actor="t", action="test", subject=str(i))
    assert (await app.audit.verify()).ok
    await app.storage.execute("DELETE FROM audit_log WHERE subject = '1'")
    result = await app.audit.verify()
    assert not result.ok and "link broken" in result.reason


async def test_concurrent_audit_records_keep_one_chain(backend_app: CollectorApp) -> None:
    app = backend_app
    await asyncio.gather(*(app.audit.record(actor="t", action="x") for _ in range(50)))
    assert (await app.audit.verify()).checked == 51
