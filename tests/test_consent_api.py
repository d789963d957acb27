"""/consent through the real app: decisions, proof of consent, withdrawal, CORS/CSRF, sources.

Clauses: 2.1 and 4.1.10-4.1.11 (consent before advertising and statistics), 5.1 (consent
bounds processing), 9.1-9.2 (records name the policy version; re-consent on a new one).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.app import CollectorApp, create_app
from collector.config import Settings, load_settings
from collector.consent import ConsentCodec
from collector.errors import ConfigError, StorageError
from tests.conftest import IPHONE_UA, SECRET, client_for, make_settings, rows
from tests.test_consent_sources import cc_cookie, tc_core

SHOP = "https://kdvonline.kz"
IP = "81.2.69.142"  # client_for's address


def db(app: CollectorApp) -> Path:
    return Path(app.settings.storage.path)


def records(app: CollectorApp) -> list[sqlite3.Row]:
    return rows(db(app), "SELECT * FROM consent_records ORDER BY id")


async def hits(app: CollectorApp) -> list[sqlite3.Row]:
    await app.writer.flush()
    return rows(db(app), "SELECT * FROM hits ORDER BY id")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, consent={"allowed_origins": (SHOP,)})


@pytest.fixture
async def browser(app: CollectorApp) -> AsyncIterator[httpx.AsyncClient]:
    """A client that keeps cookies like a browser and calls from the shop's pages."""
    async with client_for(app) as c:
        c.headers.update({"origin": SHOP, "user-agent": IPHONE_UA})
        yield c


async def test_no_decision_reads_as_undecided(browser: httpx.AsyncClient) -> None:
    resp = await browser.get("/consent")
    assert resp.status_code == 200
    assert resp.json() == {
        "statistics": False,
        "advertising": False,
        "policy_version": "1",
        "consent_id": None,
        "decided_at": None,
        "stale": False,
        "source": "cookie",
    }
    assert resp.headers["cache-control"] == "no-store"


async def test_json_grant_sets_signed_cookie_and_stores_proof_without_ip(
    app: CollectorApp, browser: httpx.AsyncClient
) -> None:
    before = int(time.time() * 1000)
    resp = await browser.post("/consent", json={"statistics": True, "advertising": True})
    assert resp.status_code == 200
    body = resp.json()
    assert body["statistics"] is body["advertising"] is True and body["stale"] is False
    assert body["decided_at"].endswith("Z")
    cookie = next(c for c in resp.headers.get_list("set-cookie") if c.startswith("kdv_consent="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Max-Age=31536000" in cookie
    consent = app.codec.decode(browser.cookies["kdv_consent"], time.time())
    assert consent is not None and consent.consent_id == body["consent_id"]
    assert (await browser.get("/consent")).json() == body  # what GET says from now on
    (rec,) = records(app)
    assert rec["consent_id"] == body["consent_id"] and rec["previous_id"] is None
    assert (rec["action"], rec["statistics"], rec["advertising"]) == ("grant", 1, 1)
    assert (rec["policy_version"], rec["source"], rec["origin"]) == ("1", "post-json", SHOP)
    assert rec["user_agent_family"] == "Mobile Safari" and rec["gpc"] == 0
    assert before <= rec["decided_at_ms"] <= int(time.time() * 1000)
    assert rec["ip_hash"] == app.consent_records.ip_hash(IP) and len(rec["ip_hash"]) == 64
    raw = b"".join(p.read_bytes() for p in db(app).parent.glob("collector.db*"))
    assert IP.encode() not in raw and b"iPhone OS" not in raw  # no raw IP or user agent


async def test_form_body_and_missing_purpose_means_refused(
    app: CollectorApp, browser: httpx.AsyncClient
) -> None:
    resp = await browser.post("/consent", data={"statistics": "1"})
    assert resp.status_code == 200
    assert (resp.json()["statistics"], resp.json()["advertising"]) == (True, False)
    resp = await browser.post(
        "/consent",
        content=b"statistics=0&advertising=0",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert resp.json()["statistics"] is False
    resp = await browser.post("/consent", json={})
    assert (resp.json()["statistics"], resp.json()["advertising"]) == (False, False)
    assert [(r["source"], r["action"]) for r in records(app)] == [
        ("post-form", "grant"),
        ("post-form", "refuse"),
        ("post-json", "refuse"),
    ]


@pytest.mark.parametrize(
    ("content", "ctype", "status", "field"),
    [
        (b'{"statistics": "yes"}', "application/json", 400, "statistics"),
        (b'{"advertising": 1}', "application/json", 400, "advertising"),
        (b'{"statistic": true}', "application/json", 400, "statistic"),
        (b"[true, false]", "application/json", 400, None),
        (b"{not json", "application/json", 400, None),
        (b"", "application/json", 400, None),
        (b"statistics=maybe", "application/x-www-form-urlencoded", 400, "statistics"),
        (b"statistics=1&statistics=0", "application/x-www-form-urlencoded", 400, "statistics"),
        (b"marketing=1", "application/x-www-form-urlencoded", 400, "marketing"),
        (b"statistics=1", "text/plain", 415, None),
        (b'{"statistics": true}' + b" " * 5000, "application/json", 413, None),
    ],
)
async def test_bad_bodies_get_a_json_error_naming_the_field(
    app: CollectorApp,
    browser: httpx.AsyncClient,
    content: bytes,
    ctype: str,
    status: int,
    field: str | None,
) -> None:
    resp = await browser.post("/consent", content=content, headers={"content-type": ctype})
    assert resp.status_code == status
    body = resp.json()
    assert body["error"] == "bad_request" and body["detail"]
    assert body.get("field") == field
    assert "set-cookie" not in resp.headers and records(app) == []


async def test_cors_answers_only_the_configured_origins_with_credentials(
    browser: httpx.AsyncClient,
) -> None:
    pre = await browser.options(
        "/consent",
        headers={
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == SHOP
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "Content-Type" in pre.headers["access-control-allow-headers"]
    got = await browser.get("/consent")
    assert got.headers["access-control-allow-origin"] == SHOP and "Origin" in got.headers["vary"]
    evil = {"origin": "https://evil.example"}
    assert (await browser.options("/consent", headers=evil)).status_code == 403
    assert (
        "access-control-allow-origin" not in (await browser.get("/consent", headers=evil)).headers
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"origin": "https://kdvonline.kz.evil.example"},
        {"origin": "", "referer": "https://evil.example/page"},
    ],
)
async def test_other_sites_cannot_change_consent(
    app: CollectorApp, browser: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    if headers.get("origin") == "":
        del browser.headers["origin"]
        headers = {k: v for k, v in headers.items() if k != "origin"}
    for method in ("POST", "DELETE"):
        resp = await browser.request(
            method, "/consent", json={"statistics": True, "advertising": True}, headers=headers
        )
        assert resp.status_code == 403 and resp.json()["error"] == "forbidden"
        assert "set-cookie" not in resp.headers
    assert records(app) == []


async def test_missing_origin_is_refused_but_the_collectors_own_pages_may_decide(
    app: CollectorApp,
) -> None:
    async with client_for(app) as c:
        assert (await c.post("/consent", json={"statistics": True})).status_code == 403
        own = {"origin": "http://testserver"}
        assert (await c.post("/consent", json={"statistics": True}, headers=own)).status_code == 200
        referer = {"referer": "http://testserver/demo/"}
        assert (await c.delete("/consent", headers=referer)).status_code == 200


async def test_withdrawal_takes_effect_at_once(
    app: CollectorApp, browser: httpx.AsyncClient
) -> None:
    granted = (await browser.post("/consent", json={"statistics": True})).json()
    await browser.get("/p.gif", params={"u": "https://kdvonline.kz/a"})
    assert "kdv_vid" in browser.cookies
    resp = await browser.delete("/consent")
    assert resp.status_code == 200
    body = resp.json()
    assert (body["statistics"], body["advertising"]) == (False, False)
    assert body["consent_id"] != granted["consent_id"] and body["decided_at"]
    set_cookies = resp.headers.get_list("set-cookie")
    assert any(c.startswith("kdv_vid=; Max-Age=0") for c in set_cookies)
    assert any(c.startswith("kdv_sid=; Max-Age=0") for c in set_cookies)
    assert "kdv_vid" not in browser.cookies
    refusal = app.codec.decode(browser.cookies["kdv_consent"], time.time())
    assert refusal is not None and refusal.purposes == 0  # a refusal, not "never asked"
    await browser.get("/p.gif", params={"u": "https://kdvonline.kz/b"})
    assert [r["page_url"] for r in await hits(app)] == ["https://kdvonline.kz/a"]
    assert [(r["action"], r["previous_id"]) for r in records(app)] == [
        ("grant", None),
        ("withdraw", granted["consent_id"]),
    ]
    assert (await browser.get("/consent")).json() == body


async def test_refusing_statistics_by_post_also_expires_the_visitor_cookie(
    browser: httpx.AsyncClient,
) -> None:
    await browser.post("/consent", json={"statistics": True})
    await browser.get("/p.gif")
    resp = await browser.post("/consent", json={"statistics": False, "advertising": True})
    assert any(c.startswith("kdv_vid=; Max-Age=0") for c in resp.headers.get_list("set-cookie"))


async def test_global_privacy_control_refuses_advertising_whatever_the_cookie_says(
    app: CollectorApp, browser: httpx.AsyncClient
) -> None:
    gpc = {"sec-gpc": "1"}
    resp = await browser.post(
        "/consent", json={"statistics": True, "advertising": True}, headers=gpc
    )
    assert (resp.json()["statistics"], resp.json()["advertising"]) == (True, False)
    assert records(app)[0]["gpc"] == 1 and records(app)[0]["advertising"] == 1  # as clicked
    assert (await browser.get("/consent", headers=gpc)).json()["advertising"] is False
    assert (await browser.get("/consent")).json()["advertising"] is True
    await browser.get("/p.gif", params={"e": "ad-top"}, headers=gpc)
    await browser.get("/p.gif", params={"e": "ad-side"})
    assert [r["placement_id"] for r in await hits(app)] == [None, "ad-side"]


async def test_dnt_counts_like_gpc_only_when_configured(tmp_path: Path) -> None:
    for honor, expected in ((False, True), (True, False)):
        s = make_settings(tmp_path / str(honor), consent={"honor_dnt": honor})
        (tmp_path / str(honor)).mkdir()
        application = create_app(s)
        async with application.lifespan(application.starlette), client_for(application) as c:
            c.headers["origin"] = "http://testserver"
            await c.post("/consent", json={"statistics": True, "advertising": True})
            assert (await c.get("/consent", headers={"dnt": "1"})).json()["advertising"] is expected


async def test_raising_the_policy_version_makes_older_consents_stale(tmp_path: Path) -> None:
    old = make_settings(tmp_path, consent={"policy_version": "2025-01"})
    codec = ConsentCodec(old.consent)
    cookie = {"kdv_consent": codec.encode(codec.issue(3))}
    for reconsent, stale in ((False, False), (True, True)):
        (tmp_path / str(reconsent)).mkdir()
        new = make_settings(
            tmp_path / str(reconsent),
            consent={"policy_version": "2026-06", "require_reconsent": reconsent},
        )
        application = create_app(new)
        async with application.lifespan(application.starlette), client_for(application) as c:
            c.cookies.update(cookie)
            state = (await c.get("/consent")).json()
            assert state["stale"] is stale and state["policy_version"] == "2026-06"
            assert state["statistics"] is not stale and state["decided_at"] is not None
            await c.get("/p.gif")
            assert len(await hits(application)) == (0 if stale else 1)


async def test_expired_consent_reads_as_never_asked(app: CollectorApp) -> None:
    old = app.codec.issue(3, now=time.time() - 400 * 86_400)
    async with client_for(app) as c:
        c.cookies["kdv_consent"] = app.codec.encode(old)
        state = (await c.get("/consent")).json()
    assert state["decided_at"] is None and state["consent_id"] is None and not state["stale"]


async def test_records_are_append_only_and_chained(
    app: CollectorApp, browser: httpx.AsyncClient
) -> None:
    ids = []
    for body in ({"statistics": True}, {"statistics": True, "advertising": True}, {}):
        ids.append((await browser.post("/consent", json=body)).json()["consent_id"])
    ids.append((await browser.delete("/consent")).json()["consent_id"])
    chain = await app.consent_records.chain(ids[1])
    assert [r["consent_id"] for r in chain] == ids
    assert [r["previous_id"] for r in chain] == [None, *ids[:-1]]
    assert [r["action"] for r in chain] == ["grant", "grant", "refuse", "withdraw"]
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn = sqlite3.connect(db(app))
        try:
            conn.execute("UPDATE consent_records SET statistics = 1")
        finally:
            conn.close()


async def test_hits_carry_the_consent_id_of_the_record_they_were_made_under(
    app: CollectorApp, browser: httpx.AsyncClient
) -> None:
    first = (await browser.post("/consent", json={"statistics": True})).json()["consent_id"]
    await browser.get("/p.gif")
    second = await browser.post("/consent", json={"statistics": True, "advertising": True})
    await browser.get("/p.gif", params={"e": "ad-top"})
    stored = [(r["consent_id"], r["placement_id"]) for r in await hits(app)]
    assert stored == [(first, None), (second.json()["consent_id"], "ad-top")]


# --- proof of consent for auditors -------------------------------------------------------


async def test_admin_api_shows_the_chain_and_audits_the_lookup(
    app: CollectorApp, browser: httpx.AsyncClient
) -> None:
    consent_id = (await browser.post("/consent", json={"statistics": True})).json()["consent_id"]
    admin = await app.tokens.create("auditor", "admin")
    analyst = await app.tokens.create("ana", "analyst")
    url = f"/api/consent/{consent_id}"
    denied = await browser.get(url, headers={"authorization": f"Bearer {analyst}"})
    assert denied.status_code == 403
    resp = await browser.get(url, headers={"authorization": f"Bearer {admin}"})
    assert resp.status_code == 200
    (record,) = resp.json()["items"]
    assert record["consent_id"] == consent_id and record["statistics"] is True
    assert record["ip_hash"] == app.consent_records.ip_hash(IP)
    missing = await browser.get(
        "/api/consent/nosuchid1", headers={"authorization": f"Bearer {admin}"}
    )
    assert missing.status_code == 404
    audit = rows(db(app), "SELECT actor, subject FROM audit_log WHERE action = 'consent.read'")
    assert ("auditor", consent_id) in [tuple(r) for r in audit]


def consent_show(app: CollectorApp, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``collector consent show ARGS`` against the app's database, as the DPO runs it."""
    env = {**os.environ, "COLLECTOR_STORAGE_PATH": str(db(app)), "COLLECTOR_CONSENT_SECRET": SECRET}
    return subprocess.run(
        [sys.executable, "-m", "collector", "consent", "show", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


async def test_cli_consent_show_prints_the_records(
    app: CollectorApp, browser: httpx.AsyncClient, tmp_path: Path
) -> None:
    consent_id = (await browser.post("/consent", json={"statistics": True})).json()["consent_id"]
    out = consent_show(app, tmp_path, consent_id, "--ip", IP)
    assert out.returncode == 0, out.stderr
    (record,) = json.loads(out.stdout)
    assert record["consent_id"] == consent_id and record["from_ip"] is True
    assert record["policy_version"] == "1" and record["action"] == "grant"
    missing = consent_show(app, tmp_path, "nosuchid1")
    assert missing.returncode == 1 and "no consent record" in missing.stderr


def test_cli_consent_show_takes_an_id_that_begins_with_a_dash(
    app: CollectorApp, tmp_path: Path
) -> None:
    # One generated id in 64 begins with "-"; it must be looked up, not read as an option.
    out = consent_show(app, tmp_path, "-bCYYiqy847lZOi_", "--ip", IP)
    assert out.returncode == 1 and "no consent record for '-bCYYiqy847lZOi_'" in out.stderr


# --- consent from an existing consent platform (consent.source) --------------------------


EXTERNAL: list[tuple[dict[str, Any], str, str, str, str]] = [
    # settings, cookie name, both purposes, statistics only, malformed
    (
        {"source": "cookieconsent"},
        "cc_cookie",
        cc_cookie(["necessary", "analytics", "marketing"]),
        cc_cookie(["necessary", "analytics"]),
        cc_cookie(["analytics"])[:-5],
    ),
    (
        {"source": "tcf"},
        "euconsent-v2",
        tc_core(purposes=range(1, 11)),
        tc_core(purposes=(1, 8, 9)),
        tc_core(purposes=range(1, 11))[:20],
    ),
    (
        {"source": "plain", "plain_cookie": "shop_consent", "plain_statistics": ("stats", "all")},
        "shop_consent",
        "all",
        "stats",
        "all\x00",
    ),
]


@pytest.mark.parametrize(("extra", "name", "both", "stats", "bad"), EXTERNAL)
async def test_external_consent_sources_gate_the_pixel(
    tmp_path: Path, extra: dict[str, Any], name: str, both: str, stats: str, bad: str
) -> None:
    s = make_settings(tmp_path, consent={"allowed_origins": (SHOP,), **extra})
    application = create_app(s)
    async with application.lifespan(application.starlette), client_for(application) as c:
        for value in (both, stats, bad):
            c.cookies[name] = value
            await c.get("/p.gif", params={"u": "https://kdvonline.kz/x", "e": "ad-top"})
        c.cookies[name] = stats
        state = (await c.get("/consent")).json()
        assert state["source"] == extra["source"] and state["statistics"] is True
        assert state["advertising"] is False and state["decided_at"] is None
        refused = await c.post("/consent", json={"statistics": True}, headers={"origin": SHOP})
        assert (
            refused.status_code == 409 and refused.json()["error"] == "consent_managed_externally"
        )
        stored = [(r["placement_id"], r["consent_id"]) for r in await hits(application)]
    assert [p for p, _ in stored] == ["ad-top", None]  # the malformed value recorded nothing
    prefix = {"cookieconsent": "cc-", "tcf": "tcf-", "plain": "plain-"}[extra["source"]]
    assert all(cid.startswith(prefix) for _, cid in stored)
    assert stored[0][1] != stored[1][1] == state["consent_id"]
    assert records(application) == []
    if extra["source"] != "plain":  # "all" is in any schema; the others are unique
        for value in (both, stats):
            assert value.encode() not in db(application).read_bytes()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[consent]\nsource = 'onetrust'\n", "consent.source: must be one of"),
        ("[consent]\ntcf_statistics = [0, 8]\n", "consent.tcf_statistics"),
        ("[consent]\ntcf_advertising = []\n", "consent.tcf_advertising"),
        ("[consent]\ntcf_advertising = ['1']\n", "consent.tcf_advertising: expected a list of"),
        ("[consent]\ncookieconsent_advertising = ['analytics']\n", "already"),
        ("[consent]\nallowed_origins = ['https://kdvonline.kz/']\n", "not an origin"),
        ("[consent]\nplain_cookie = 'a b'\n", "consent.plain_cookie"),
        ("[consent]\nip_pepper = 'short'\n", "consent.ip_pepper"),
        ("[visitor]\nsecure = false\nsame_site = 'none'\n", "visitor.same_site"),
    ],
)
def test_consent_config_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, environ={})


def test_tcf_mapping_from_the_environment() -> None:
    s = load_settings(None, environ={"COLLECTOR_CONSENT_TCF_STATISTICS": "1, 9"})
    assert s.consent.tcf_statistics == (1, 9)


async def test_cross_site_deployments_get_samesite_none(tmp_path: Path) -> None:
    s = make_settings(tmp_path, visitor={"same_site": "none", "secure": True})
    application = create_app(s)
    async with application.lifespan(application.starlette), client_for(application) as c:
        resp = await c.post(
            "/consent", json={"statistics": True}, headers={"origin": "http://testserver"}
        )
        cookie = resp.headers["set-cookie"]
        assert "SameSite=None" in cookie and "Secure" in cookie
        c.cookies["kdv_consent"] = cookie.split(";")[0].partition("=")[2]
        pixel = await c.get("/p.gif")
        assert all("SameSite=None; Secure" in v for v in pixel.headers.get_list("set-cookie"))


# --- static files and the demo -----------------------------------------------------------


async def test_scripts_are_served_and_the_demo_only_when_enabled(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    script = await client.get("/static/consent.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert (await client.get("/static/pixel.js")).status_code == 200
    assert (await client.get("/demo/")).status_code == 404
    demo_settings = make_settings(tmp_path / "d", server={"demo": True})
    (tmp_path / "d").mkdir()
    application = create_app(demo_settings)
    async with application.lifespan(application.starlette), client_for(application) as c:
        page = await c.get("/demo/")
        assert page.status_code == 200 and "data-kdv-pixel" in page.text


async def test_consent_records_are_kept_append_only_on_each_backend(
    backend_app: CollectorApp, backend_client: httpx.AsyncClient
) -> None:
    resp = await backend_client.post(
        "/consent",
        json={"statistics": True, "advertising": True},
        headers={"origin": "http://testserver"},  # the collector's own page
    )
    assert resp.status_code == 200
    consent_id = resp.json()["consent_id"]
    record = await backend_app.storage.fetch_one(
        "SELECT action, statistics, advertising, ip_hash FROM consent_records WHERE consent_id = ?",
        [consent_id],
    )
    assert record is not None
    assert (record["action"], record["statistics"], record["advertising"]) == ("grant", 1, 1)
    assert len(record["ip_hash"]) == 64 and IP not in str(record)
    with pytest.raises(StorageError, match="append-only"):
        await backend_app.storage.execute("UPDATE consent_records SET statistics = 0")
