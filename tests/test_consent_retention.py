"""Retention of proofs of consent (5.1, 5.5): kept for their own period, then purged by the
retention job, audited; the database refuses every edit and every other delete.

On SQLite and PostgreSQL (the triggers are per backend).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from collector import retention
from collector.app import CollectorApp
from collector.cli import main
from collector.config import ConfigError, load_settings
from collector.consent_records import ConsentRecord
from collector.errors import StorageError
from tests.conftest import SECRET
from tests.test_governance import DAY, NOW, bearer, count


@pytest.fixture
async def app(backend_app: CollectorApp) -> CollectorApp:
    return backend_app


async def decided(app: CollectorApp, consent_id: str, days_ago: float) -> None:
    await app.consent_records.append(
        ConsentRecord(
            consent_id=consent_id,
            previous_id=None,
            action="grant",
            statistics=True,
            advertising=False,
            policy_version="1",
            decided_at_ms=int(NOW - days_ago * DAY),
            source="post-json",
            origin="https://kdvonline.kz",
            user_agent_family="Chrome",
            ip_hash=app.consent_records.ip_hash("81.2.69.142"),
            gpc=False,
        )
    )


async def ids(app: CollectorApp) -> list[str]:
    found = await app.storage.fetch_all("SELECT consent_id FROM consent_records ORDER BY id")
    return [r["consent_id"] for r in found]


def test_proofs_outlive_every_hit_recorded_under_them_by_default(tmp_path: Path) -> None:
    env = {"COLLECTOR_STORAGE_PATH": str(tmp_path / "c.db"), "COLLECTOR_CONSENT_SECRET": SECRET}
    default = load_settings(None, environ=env)
    # The last hit under a consent comes period_days after the decision and is kept
    # retention.days (default: period_days) more.
    assert retention.consent_records_days(default) == 365 + 365
    shorter_hits = load_settings(None, environ={**env, "COLLECTOR_RETENTION_DAYS": "90"})
    assert retention.consent_records_days(shorter_hits) == 365 + 90
    longer = load_settings(
        None, environ={**env, "COLLECTOR_CONSENT_RECORDS_RETENTION_DAYS": "1825"}
    )
    assert retention.consent_records_days(longer) == 1825
    with pytest.raises(ConfigError, match=r"records_retention_days: at least 730"):
        load_settings(None, environ={**env, "COLLECTOR_CONSENT_RECORDS_RETENTION_DAYS": "400"})


async def test_expired_consent_records_are_purged_by_the_retention_job_and_audited(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    for consent_id, days_ago in (("c-old", 800), ("c-edge", 731), ("c-kept", 729), ("c-new", 1)):
        await decided(app, consent_id, days_ago)
    admin = bearer(await app.tokens.create("dpo", "admin"))
    plan = (await client.get("/api/admin/retention", headers=admin)).json()
    assert plan["consent_records"]["days"] == 730
    assert plan["consent_records"]["pending"] == 2
    ran = await client.post("/api/admin/retention/run", headers=admin)
    assert ran.json() == {"rows": 0, "consent_records": 2}
    assert await ids(app) == ["c-kept", "c-new"]
    (entry,) = await app.audit.entries(action="consent_records.purge")
    detail = json.loads(entry["detail"])
    assert entry["actor"] == "dpo" and detail["rows"] == 2 and detail["days"] == 730
    register = await app.storage.fetch_all("SELECT * FROM consent_record_purges")
    assert [(r["days"], r["pending"], r["actor"]) for r in register] == [(730, 2, "dpo")]
    # The server's periodic job does the same, as "system"; nothing due: nothing audited.
    assert await app.governance.apply_consent_retention() == 0
    assert len(await app.audit.entries(action="consent_records.purge")) == 1
    await decided(app, "c-older", 1000)
    assert await app.governance.apply_consent_retention() == 1
    latest = (await app.audit.entries(action="consent_records.purge"))[0]
    assert latest["actor"] == "system"
    assert (await app.audit.verify()).ok


async def test_the_database_refuses_edits_and_any_delete_but_the_registered_purge(
    app: CollectorApp,
) -> None:
    await decided(app, "c-old", 800)
    await decided(app, "c-new", 1)
    for sql in (
        "UPDATE consent_records SET statistics = 0 WHERE consent_id = 'c-new'",
        "UPDATE consent_records SET statistics = 0 WHERE consent_id = 'c-old'",
        "DELETE FROM consent_records WHERE consent_id = 'c-new'",
        # Old enough, but no purge registered it: refused as well.
        "DELETE FROM consent_records WHERE consent_id = 'c-old'",
    ):
        with pytest.raises(StorageError):
            await app.storage.execute(sql)
    assert await ids(app) == ["c-old", "c-new"]
    plan = await retention.consent_records_plan(app.storage, app.settings)
    assert await retention.purge_consent_records(app.storage, plan, 1, "test") == 1
    # The purge moved the line for c-old only; edits stay forbidden for every record.
    with pytest.raises(StorageError):
        await app.storage.execute("DELETE FROM consent_records WHERE consent_id = 'c-new'")
    with pytest.raises(StorageError):
        await app.storage.execute("UPDATE consent_records SET gpc = 1")
    # The register is append-only, and cannot reach into the future.
    for sql in (
        "UPDATE consent_record_purges SET cutoff_ms = 0",
        "DELETE FROM consent_record_purges",
    ):
        with pytest.raises(StorageError):
            await app.storage.execute(sql)
    with pytest.raises(StorageError):
        await app.storage.execute(
            "INSERT INTO consent_record_purges (cutoff_ms, days, pending, actor) "
            "VALUES (?, 0, 0, 'x')",
            [NOW + DAY],
        )
    assert await ids(app) == ["c-new"]
    assert await count(app, "SELECT count(*) AS n FROM consent_record_purges") == 1


async def test_purge_goes_in_chunks(app: CollectorApp) -> None:
    for i in range(5):
        await decided(app, f"c-{i}", 900 + i)
    plan = await retention.consent_records_plan(app.storage, app.settings)
    assert await retention.purge_consent_records(app.storage, plan, 2, "test", 0) == 5
    assert await ids(app) == []


def test_cli_purge_says_what_it_would_delete_and_audits_what_it_does(tmp_path: Path) -> None:
    env = {
        "COLLECTOR_STORAGE_PATH": str(tmp_path / "c.db"),
        "COLLECTOR_CONSENT_SECRET": SECRET,
        "COLLECTOR_CONSENT_PERIOD_DAYS": "10",
        "COLLECTOR_RETENTION_DAYS": "5",
    }
    runner = CliRunner()
    assert runner.invoke(main, ["purge"], env=env).exit_code == 0  # creates the database
    with sqlite3.connect(tmp_path / "c.db") as db:
        db.execute(
            "INSERT INTO consent_records (consent_id, action, statistics, advertising, "
            "policy_version, decided_at_ms, source, user_agent_family, ip_hash, gpc) "
            "VALUES ('c-1', 'grant', 1, 0, '1', ?, 'post-json', 'Chrome', 'h', 0)",
            (NOW - 16 * DAY,),
        )
    dry = runner.invoke(main, ["purge", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "would delete 1 consent records older than 15 days" in dry.stdout
    done = runner.invoke(main, ["purge"], env=env)
    assert "deleted 1 consent records older than 15 days" in done.stdout
    audit = runner.invoke(main, ["audit", "list"], env=env).stdout
    assert "consent_records.purge" in audit
