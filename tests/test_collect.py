"""POST /collect through the real ASGI app: app and server-side events behind the pixel's
consent gate (3.3, 4.1.11, 5.1), counted once however often a batch is retried."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.app import CollectorApp, create_app
from collector.collect import OPENAPI, SCHEMAS, app_consent_token
from collector.collect.events import clamp_time
from collector.config import CollectSettings, Settings
from collector.consent import ConsentCodec
from tests.conftest import (
    GEOIP,
    IPHONE_UA,
    ROOT,
    client_for,
    consent_value,
    make_settings,
    rows,
)

INSTANCE = "app-instance-0001"
APP_UA = "KDV/3.2.1 CFNetwork/1408.0.4 Darwin/22.5.0"


def now_ms() -> int:
    return int(time.time() * 1000)


def event(event_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": event_id, "time": now_ms(), "screen": "Catalog/Item", **fields}


def batch(*events: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"instance_id": INSTANCE, "events": list(events), **fields}


async def post(
    client: httpx.AsyncClient,
    body: Any,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = {"user-agent": APP_UA, **(headers or {})}
    if token is not None:
        sent["x-consent"] = token
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post("/collect", content=content, headers=sent)


async def hits(app: CollectorApp, columns: str = "*") -> list[dict[str, Any]]:
    await app.writer.flush()
    return await app.storage.fetch_all(f"SELECT {columns} FROM hits ORDER BY id")


async def counts(app: CollectorApp) -> list[tuple[Any, ...]]:
    await app.writer.flush()
    found = await app.storage.fetch_all("SELECT path, consent, hits FROM pixel_counts ORDER BY 1")
    return [tuple(r.values()) for r in found]


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Any]:
    """Start apps with custom [collect] or [server] settings; all stop at the end."""
    running: list[tuple[CollectorApp, Any]] = []

    async def start(**sections: dict[str, Any]) -> CollectorApp:
        settings = make_settings(
            tmp_path, geoip={"city_db": str(GEOIP / "GeoIP2-City-Test.mmdb")}, **sections
        )
        app = create_app(settings)
        lifespan = app.lifespan(app.starlette)
        await lifespan.__aenter__()
        running.append((app, lifespan))
        return app

    yield start
    for _, lifespan in reversed(running):
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def app(backend_app: CollectorApp) -> CollectorApp:
    """Every test here runs on SQLite and on PostgreSQL."""
    return backend_app


# --- recording -------------------------------------------------------------------------


async def test_consented_batch_records_app_events_with_declared_device(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    consent = app.codec.issue(3)
    before = now_ms()
    resp = await post(
        client,
        batch(
            event("e1", referrer="Home", app_version="3.2.1"),
            event("e2", type="ad_impression", placement="ad-top", screen="Home"),
            app_version="3.2.0",
            os="iOS",
            os_version="17.1",
            device_model="iPhone14,2",
        ),
        app.codec.encode(consent),
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["consent"], body["received"], body["stored"]) == ("granted", 2, 2)
    assert [r["status"] for r in body["results"]] == ["stored", "stored"]
    first, second = await hits(app)
    assert first["source"] == "app" and first["visitor_id"] == INSTANCE
    assert first["page_url"] == "app://Catalog/Item" and first["referrer_url"] == "app://Home"
    assert (first["event_id"], first["event_type"]) == ("e1", "screen_view")
    assert first["app_version"] == "3.2.1" and second["app_version"] == "3.2.0"
    assert (first["os_family"], first["os_version"]) == ("iOS", "17.1")
    assert (first["device_family"], first["device_brand"]) == ("iPhone", "Apple")
    assert (first["device_model"], first["device_class"]) == ("iPhone14,2", "mobile")
    assert first["user_agent"] == APP_UA and first["ip"] == "81.2.69.142"
    assert (first["country"], first["city"]) == ("GB", "London")
    assert (first["consent_id"], first["policy_version"]) == (consent.consent_id, "1")
    assert before <= first["received_ms"] <= now_ms()
    assert first["ts_ms"] == first["client_ts_ms"] and first["time_flag"] is None
    assert len(first["session_id"]) == 32
    assert (second["event_type"], second["placement_id"]) == ("ad_impression", "ad-top")
    assert await counts(app) == [("app://Catalog/Item", "granted", 1), ("app://Home", "granted", 1)]


async def test_android_model_resolves_to_brand(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    body = batch(event("a1"), os="Android", os_version="13", device_model="SM-G991B")
    resp = await post(client, body, consent_value(app, 1), headers={"user-agent": "okhttp/4.9.3"})
    assert resp.status_code == 200
    (row,) = await hits(app, "os_family, device_brand, device_class, browser_family")
    # okhttp alone would read as a script; the app's declaration wins.
    assert row == {
        "os_family": "Android",
        "device_brand": "Samsung",
        "device_class": "mobile",
        "browser_family": "okhttp",
    }


async def test_an_app_that_declares_no_device_is_not_taken_for_a_bot(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    resp = await post(client, batch(event("a1")), consent_value(app, 1), {"user-agent": "okhttp/4"})
    assert resp.json()["stored"] == 1
    (row,) = await hits(app, "browser_family, device_class, device_model")
    assert row == {"browser_family": "okhttp", "device_class": "mobile", "device_model": None}


async def test_server_side_report_takes_the_visitor_ip_from_a_trusted_proxy(started: Any) -> None:
    app = await started(server={"trusted_proxies": ("10.0.0.0/8",)})
    async with client_for(app, ip="10.1.2.3") as backend:
        resp = await post(
            backend,
            batch(
                {
                    "id": "s1",
                    "time": now_ms(),
                    "type": "ad_impression",
                    "page": "https://kdvonline.kz/cart?token=abc&utm_source=mail#x",
                    "placement": "ad-side",
                },
                source="server",
                instance_id="a" * 32,
            ),
            consent_value(app, 3),
            headers={"x-forwarded-for": "89.160.20.112", "user-agent": IPHONE_UA},
        )
    assert resp.status_code == 200, resp.text
    (row,) = await hits(app, "source, ip, country, page_url, placement_id, device_class")
    assert row == {
        "source": "server",
        "ip": "89.160.20.112",
        "country": "SE",
        "page_url": "https://kdvonline.kz/cart?utm_source=mail",
        "placement_id": "ad-side",
        "device_class": "mobile",
    }


# --- the consent gate ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, state",
    [
        ("missing", "absent"),
        ("tampered", "invalid"),
        ("expired", "invalid"),
        ("unsigned", "invalid"),
        ("refused", "refused"),
        ("advertising-only", "refused"),
    ],
)
async def test_events_without_valid_statistics_consent_store_nothing_personal(
    app: CollectorApp, client: httpx.AsyncClient, kind: str, state: str
) -> None:
    good = consent_value(app, 1)
    token = {
        "missing": None,
        "tampered": good.replace(".1.1.", ".3.1.", 1),
        "expired": consent_value(app, 1, now=time.time() - 366 * 86_400),
        "unsigned": good.rsplit(".", 1)[0],
        "refused": consent_value(app, 0),
        "advertising-only": consent_value(app, 2),
    }[kind]
    resp = await post(
        client,
        batch(event("e1", placement="ad-top"), device_model="iPhone14,2"),
        token,
        headers={"user-agent": IPHONE_UA},
    )
    assert resp.status_code == 200
    assert resp.json()["consent"] == state
    assert resp.json()["results"] == [{"index": 0, "id": "e1", "status": "not_recorded"}]
    assert await hits(app) == []
    assert await counts(app) == [("app://Catalog/Item", state, 1)]
    dedupe = await app.storage.fetch_all("SELECT * FROM collect_dedupe")
    assert dedupe == []  # not even the instance id is kept without consent
    if app.settings.storage.backend == "sqlite":  # the whole file, not just the tables
        db = Path(app.settings.storage.path)
        raw = db.read_bytes() + Path(f"{db}-wal").read_bytes()
        for personal in (b"81.2.69.142", b"iPhone", INSTANCE.encode(), b"ad-top"):
            assert personal not in raw


async def test_placement_needs_advertising_consent_and_no_gpc(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    ad = {"type": "ad_impression", "placement": "ad-top"}
    await post(client, batch(event("s", **ad)), consent_value(app, 1))
    await post(client, batch(event("b", **ad)), consent_value(app, 3))
    await post(client, batch(event("g", **ad)), consent_value(app, 3), headers={"sec-gpc": "1"})
    stored = await hits(app, "event_id, event_type, placement_id")
    assert [tuple(r.values()) for r in stored] == [
        ("s", "ad_impression", None),
        ("b", "ad_impression", "ad-top"),
        ("g", "ad_impression", None),
    ]


async def test_token_shaped_for_apps_opens_the_gate(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    body = app_consent_token(app.codec, app.codec.issue(1))
    assert (body["statistics"], body["advertising"], body["header"]) == (True, False, "X-Consent")
    assert body["expires_at"].endswith("Z") and 364 * 86_400 < body["expires_in"] <= 365 * 86_400
    resp = await post(client, batch(event("t1")), body["token"])
    assert resp.json()["stored"] == 1


async def test_an_app_obtains_its_consent_token_from_post_consent(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    # No Origin and no cookie jar: an app keeps the token and sends it in X-Consent.
    resp = await client.post(
        "/consent", json={"client": "app", "statistics": True, "advertising": False}
    )
    assert resp.status_code == 200 and "set-cookie" not in resp.headers
    body = resp.json()
    assert (body["statistics"], body["advertising"], body["header"]) == (True, False, "X-Consent")
    record = await app.storage.fetch_one(
        "SELECT action, source FROM consent_records WHERE consent_id = ?", [body["consent_id"]]
    )
    assert record == {"action": "grant", "source": "app"}
    assert (await post(client, batch(event("via-consent")), body["token"])).json()["stored"] == 1
    bad = await client.post("/consent", json={"client": "tv", "statistics": True})
    assert bad.status_code == 400 and bad.json()["field"] == "client"


# --- idempotency -----------------------------------------------------------------------


async def test_same_batch_sent_three_times_counts_once(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    token = consent_value(app, 1)
    body = batch(event("e1"), event("e2"), event("e1"))  # a repeat inside the batch, too
    answers = [(await post(client, body, token)).json() for _ in range(3)]
    assert [a["results"][0]["status"] for a in answers] == ["stored", "duplicate", "duplicate"]
    assert answers[0]["results"][2]["status"] == "duplicate"
    assert [(a["stored"], a["duplicate"]) for a in answers] == [(2, 1), (0, 3), (0, 3)]
    assert len(await hits(app)) == 2
    assert await counts(app) == [("app://Catalog/Item", "granted", 2)]


async def test_event_ids_are_per_app_instance(app: CollectorApp, client: httpx.AsyncClient) -> None:
    token = consent_value(app, 1)
    await post(client, batch(event("e1")), token)
    resp = await post(client, batch(event("e1"), instance_id="other-instance-02"), token)
    assert resp.json()["stored"] == 1


async def test_retry_after_a_restart_still_counts_once(started: Any) -> None:
    first = await started()
    token = consent_value(first, 1)
    async with client_for(first) as c:
        assert (await post(c, batch(event("e1")), token)).json()["stored"] == 1
    await first.shutdown()
    second = await started()  # same database file, fresh process state
    async with client_for(second) as c:
        again = (await post(c, batch(event("e1"), event("e2")), token)).json()
    assert [r["status"] for r in again["results"]] == ["duplicate", "stored"]
    assert [r["event_id"] for r in await hits(second, "event_id")] == ["e1", "e2"]


async def test_a_retry_after_the_dedupe_window_counts_again(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    token = consent_value(app, 1)
    await post(client, batch(event("e1")), token)
    await app.storage.execute("UPDATE collect_dedupe SET seen_ms = seen_ms - ?", (73 * 3_600_000,))
    assert (await post(client, batch(event("e1")), token)).json()["stored"] == 1


async def test_unconsented_retries_move_the_anonymous_counter_once(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    for _ in range(3):
        await post(client, batch(event("e1")))
    assert await counts(app) == [("app://Catalog/Item", "absent", 1)]


async def test_events_the_writer_cannot_take_are_retryable(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    token = consent_value(app, 1)
    await app.writer.stop()  # the queue refuses everything
    resp = await post(client, batch(event("e1")), token)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["results"][0]["status"] == "retry"
    await app.writer.start()
    assert (await post(client, batch(event("e1")), token)).json()["stored"] == 1


# --- time ------------------------------------------------------------------------------


async def test_implausible_client_times_are_clamped_and_flagged(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    t = now_ms()
    day = 86_400_000
    resp = await post(
        client,
        batch(
            event("future", time=t + day),
            event("drift", time=t + 10_000),
            event("stale", time=t - 10 * day),
            event("ok", time="2020-01-01T00:00:00Z"),
            event("recent", time=t - 3_600_000),
        ),
        consent_value(app, 1),
    )
    assert resp.status_code == 200, resp.text
    flags = {r["id"]: r.get("time_flag") for r in resp.json()["results"]}
    assert flags == {
        "future": "future",
        "drift": None,
        "stale": "stale",
        "ok": "stale",
        "recent": None,
    }
    stored = {r["event_id"]: r for r in await hits(app)}
    for name in ("future", "drift"):
        assert stored[name]["ts_ms"] == stored[name]["received_ms"]
    assert stored["future"]["client_ts_ms"] == t + day
    stale = stored["stale"]
    assert stale["ts_ms"] == stale["received_ms"] - 72 * 3_600_000
    assert stale["client_ts_ms"] == t - 10 * day and stale["time_flag"] == "stale"
    assert stored["ok"]["client_ts_ms"] == 1_577_836_800_000
    assert stored["recent"]["ts_ms"] == t - 3_600_000 and stored["recent"]["time_flag"] is None


def test_clamp_window_follows_the_settings() -> None:
    s = CollectSettings(max_age_hours=1, max_future_s=5)
    assert clamp_time(1_000_000_000, 1_000_000_000, s) == (1_000_000_000, None)
    assert clamp_time(1_000_004_000, 1_000_000_000, s) == (1_000_000_000, None)
    assert clamp_time(1_000_006_000, 1_000_000_000, s) == (1_000_000_000, "future")
    assert clamp_time(1_000_000_000 - 3_600_001, 1_000_000_000, s) == (
        1_000_000_000 - 3_600_000,
        "stale",
    )


# --- bad input -------------------------------------------------------------------------


async def test_malformed_json_is_a_400(app: CollectorApp, client: httpx.AsyncClient) -> None:
    resp = await post(client, b'{"instance_id": "x", "events": [', consent_value(app, 1))
    assert resp.status_code == 400
    assert resp.json()["error"] == "bad_request" and "malformed JSON" in resp.json()["detail"]


BAD_BATCHES: list[tuple[Any, str | None]] = [
    ([], None),
    ({"events": [{"id": "e"}]}, "instance_id"),
    ({"instance_id": "short", "events": [{"id": "e"}]}, "instance_id"),
    ({"instance_id": INSTANCE, "events": []}, "events"),
    ({"instance_id": INSTANCE, "events": {"id": "e"}}, "events"),
    ({"instance_id": INSTANCE, "events": [{}], "source": "web"}, "source"),
    ({"instance_id": INSTANCE, "events": [{}], "os": "x" * 40}, "os"),
    ({"instance_id": INSTANCE, "events": [{}], "instanceId": "x"}, "instanceId"),
]


async def test_a_bad_batch_is_a_400_naming_the_field(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    for body, field in BAD_BATCHES:
        resp = await post(client, body, consent_value(app, 1))
        assert resp.status_code == 400, body
        assert (resp.json()["field"], resp.json()["index"]) == (field, None), body


BAD_EVENTS: list[tuple[Any, str]] = [
    ({"time": 1}, "id"),
    ({"id": "x y", "time": 1}, "id"),
    ({"id": "e"}, "time"),
    ({"id": "e", "time": "yesterday"}, "time"),
    ({"id": "e", "time": "2024-01-01T00:00:00"}, "time"),
    ({"id": "e", "time": True}, "time"),
    ({"id": "e", "time": 1, "screen": "A", "page": "https://s.kz/"}, "screen"),
    ({"id": "e", "time": 1}, "page"),
    ({"id": "e", "time": 1, "page": "javascript:alert(1)"}, "page"),
    ({"id": "e", "time": 1, "screen": "A", "type": "purchase"}, "type"),
    ({"id": "e", "time": 1, "screen": "A", "type": "ad_impression"}, "placement"),
    ({"id": "e", "time": 1, "screen": "A", "placement": "<script>"}, "placement"),
    ({"id": "e", "time": 1, "screen": ["A"]}, "screen"),
    ({"id": "e", "time": 1, "screen": "A", "colour": "red"}, "colour"),
    ({"id": "e", "time": 1, "screen": "A", "device_model": "x\n"}, "device_model"),
]


async def test_a_batch_of_bad_events_is_a_400_naming_index_and_field(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    resp = await post(client, batch(*(bad for bad, _ in BAD_EVENTS)), consent_value(app, 1))
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert (body["error"], body["index"], body["field"]) == ("bad_request", 0, "id")
    assert body["detail"].startswith("no valid events; event 0: id: ")
    assert [(r["index"], r["status"], r["field"]) for r in body["results"]] == [
        (i, "rejected", field) for i, (_, field) in enumerate(BAD_EVENTS)
    ]
    assert await hits(app) == []
    assert await counts(app) == []


async def test_mixed_batch_stores_the_good_and_reports_each_bad_event(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    body = batch(event("ok1"), {"id": "bad1", "screen": "A"}, event("ok2"), "not an object")
    resp = await post(client, body, consent_value(app, 1))
    assert resp.status_code == 207
    answer = resp.json()
    assert (answer["stored"], answer["rejected"]) == (2, 2)
    detail = answer["results"][1]["detail"]
    assert answer["results"] == [
        {"index": 0, "id": "ok1", "status": "stored"},
        {"index": 1, "status": "rejected", "field": "time", "detail": detail},
        {"index": 2, "id": "ok2", "status": "stored"},
        {"index": 3, "status": "rejected", "field": "", "detail": "an event must be a JSON object"},
    ]
    assert [r["event_id"] for r in await hits(app, "event_id")] == ["ok1", "ok2"]


async def test_body_too_large_is_a_413_by_header_and_by_stream(started: Any) -> None:
    app = await started(collect={"max_bytes": 2048})
    big = json.dumps(batch(*[event(f"e{i}") for i in range(40)])).encode()
    assert len(big) > 2048
    async with client_for(app) as c:
        by_header = await post(c, big, consent_value(app, 1))

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
            for start in range(0, len(big), 512):
                yield big[start : start + 512]

        by_stream = await c.post("/collect", content=chunks())
        bomb = gzip.compress(b" " * 100_000 + b"{}")
        by_gzip = await c.post("/collect", content=bomb, headers={"content-encoding": "gzip"})
    for resp in (by_header, by_stream, by_gzip):
        assert resp.status_code == 413 and resp.json()["error"] == "too_large"
    assert await hits(app) == []


async def test_too_many_events_is_a_413(started: Any) -> None:
    app = await started(collect={"max_events": 3})
    async with client_for(app) as c:
        resp = await post(c, batch(*[event(f"e{i}") for i in range(4)]), consent_value(app, 1))
    assert resp.status_code == 413 and resp.json()["field"] == "events"


async def test_gzip_bodies_are_accepted(app: CollectorApp, client: httpx.AsyncClient) -> None:
    resp = await post(
        client,
        gzip.compress(json.dumps(batch(event("z1"))).encode()),
        consent_value(app, 1),
        headers={"content-encoding": "gzip"},
    )
    assert resp.json()["stored"] == 1
    other = await post(client, b"{}", headers={"content-encoding": "br"})
    assert other.status_code == 415


async def test_rate_limit_per_app_instance_is_a_429_with_retry_after(started: Any) -> None:
    app = await started(collect={"rate_per_instance": 2})
    token = consent_value(app, 1)
    async with client_for(app) as c:
        codes = [(await post(c, batch(event(f"e{i}")), token)).status_code for i in range(3)]
        limited = await post(c, batch(event("e9")), token)
        other = await post(c, batch(event("e9"), instance_id="other-instance-02"), token)
    assert codes == [200, 200, 429]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"] == "rate_limited"
    assert other.status_code == 200
    assert len(await hits(app)) == 3


async def test_rate_limit_per_ip_is_a_429_with_retry_after(started: Any) -> None:
    app = await started(collect={"rate_per_ip": 1})
    async with client_for(app, ip="89.160.20.112") as c:
        assert (await post(c, batch(event("e1")))).status_code == 200
        limited = await post(c, batch(event("e2"), instance_id="other-instance-02"))
    async with client_for(app, ip="81.2.69.142") as c:
        assert (await post(c, batch(event("e3")))).status_code == 200
    assert limited.status_code == 429 and limited.headers["retry-after"] == "60"


async def test_disabled_collection_is_a_404(started: Any) -> None:
    app = await started(collect={"enabled": False})
    async with client_for(app) as c:
        assert (await post(c, batch(event("e1")), consent_value(app, 1))).status_code == 404


async def test_metrics_count_events_by_outcome(
    app: CollectorApp, client: httpx.AsyncClient
) -> None:
    await post(client, batch(event("e1"), {"id": "x"}), consent_value(app, 1))
    text = (await client.get("/metrics")).text
    assert 'collector_collect_events_total{status="stored"} 1.0' in text
    assert 'collector_collect_events_total{status="rejected"} 1.0' in text
    assert 'collector_collect_batches_total{code="207"} 1.0' in text


# --- documentation ---------------------------------------------------------------------


def test_example_config_documents_every_collect_key() -> None:
    text = (ROOT / "config.example.toml").read_text()
    assert "\n[collect]\n" in text
    for key in CollectSettings.__dataclass_fields__:
        assert f"\n{key} = " in text.split("\n[collect]\n", 1)[1], f"collect.{key}"
    assert Settings().collect == CollectSettings()


def test_openapi_description_refers_only_to_its_own_schemas() -> None:
    operation = OPENAPI["/collect"]["post"]
    assert set(operation["responses"]) == {"200", "207", "400", "404", "413", "415", "429", "503"}
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(OPENAPI)
    walk(SCHEMAS)
    assert refs <= set(SCHEMAS)
    json.dumps(OPENAPI)


# --- a real server ---------------------------------------------------------------------


@pytest.mark.slow
def test_real_server_counts_a_retried_batch_once_and_refuses_a_chunked_flood(
    serve: Any, tmp_path: Path
) -> None:
    server = serve(env={"COLLECTOR_COLLECT_MAX_BYTES": "4096"})
    codec = ConsentCodec(make_settings(tmp_path).consent)
    token = codec.encode(codec.issue(1))
    body = json.dumps(batch(event("r1"), event("r2"))).encode()
    with httpx.Client(base_url=server.url, headers={"x-consent": token}) as c:
        statuses = [c.post("/collect", content=body).json()["stored"] for _ in range(3)]
        flood = c.post("/collect", content=iter([b" " * 1024] * 16))
    assert statuses == [2, 0, 0]
    assert flood.status_code == 413
    server.stop()
    stored = rows(tmp_path / "collector.db", "SELECT event_id, source FROM hits ORDER BY id")
    assert [tuple(r) for r in stored] == [("r1", "app"), ("r2", "app")]
