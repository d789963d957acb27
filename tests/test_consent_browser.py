"""The whole consent flow in real headless Chromium against a real ``collector serve --demo``.

Open the demo store -> nothing personal recorded; Accept -> reload -> a hit with every
field; withdraw -> no further hit (2.1, 4.1.10-4.1.11, 5.1). Debian's ``chromium`` is driven
by Playwright for Python; Playwright never downloads a browser of its own here. A
screenshot of the banner is left in ``artifacts/`` (not committed).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import GEOIP, ROOT, Server, rows

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"
VISITOR_IP = "81.2.69.142"  # in the MaxMind test database: London, GB


def _unavailable(reason: str) -> None:
    # Locally a missing browser is a skip; in CI it must not pass silently.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        _unavailable(
            "Debian's chromium is not installed at /usr/bin/chromium (apt install chromium)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            # Root in a container: no user namespaces for the sandbox.
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


def poll(query: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 10) -> Any:
    """Re-run ``query`` until ``done`` says so (hits reach the database in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = query()
        except sqlite3.OperationalError:  # tables not migrated yet, or a busy moment
            value = None
        if value is not None and done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; last value: {value!r}")
        time.sleep(0.05)


def test_banner_accept_reload_withdraw_in_chromium(
    browser: Browser, serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve(
        env={
            "COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": "20",
            "COLLECTOR_GEOIP_CITY_DB": str(GEOIP / "GeoIP2-City-Test.mmdb"),
            # The browser's requests name a public visitor address through a trusted proxy
            # header, so the geo fields have something to resolve.
            "COLLECTOR_SERVER_TRUSTED_PROXIES": "127.0.0.1/32",
        },
        args=["--demo"],
    )
    database = tmp_path / "collector.db"

    def hits() -> list[sqlite3.Row]:
        return rows(database, "SELECT * FROM hits ORDER BY id")

    def counted(state: str) -> int:
        found = rows(database, "SELECT sum(hits) FROM pixel_counts WHERE consent = ?", (state,))
        return int(found[0][0] or 0)

    # Headless Chromium says "HeadlessChrome", which is rightly classified as a bot; the
    # visitor here is a person, so the browser introduces itself as the desktop Chrome it is.
    probe = browser.new_page()
    user_agent = probe.evaluate("navigator.userAgent").replace("HeadlessChrome", "Chrome")
    probe.close()
    context = browser.new_context(
        user_agent=user_agent,
        extra_http_headers={"X-Forwarded-For": VISITOR_IP},
        viewport={"width": 1280, "height": 800},
    )
    page: Page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    demo = f"{server.url}/demo/?utm_source=newsletter&token=abc123"
    try:
        # 1. First visit: the banner asks; both ad pixels are only counted anonymously.
        page.goto(demo, referer="http://search.example/results?q=kdv")
        banner = page.get_by_role("dialog")
        banner.wait_for(state="visible")
        assert banner.get_attribute("lang") == "ru"  # <html lang="ru">
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "consent-banner.png"))
        poll(lambda: counted("absent"), lambda n: n == 2)
        assert hits() == []
        assert not [c for c in context.cookies() if c["name"] in ("kdv_vid", "kdv_sid")]

        # The banner overlays the page (no layout shift) and takes focus for the keyboard.
        assert banner.evaluate("el => getComputedStyle(el).position") == "fixed"
        shift = page.evaluate(
            """() => new Promise(done => {
                 let sum = 0;
                 new PerformanceObserver(list => {
                   for (const entry of list.getEntries()) sum += entry.value;
                 }).observe({type: "layout-shift", buffered: true});
                 setTimeout(() => done(sum), 200);  // buffered entries arrive in a task
               })"""
        )
        assert shift < 0.01
        assert page.evaluate("document.activeElement.getAttribute('role')") == "dialog"

        # 2. Accept all -- with the keyboard -- then reload: a hit with every field.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Принять все"
        with page.expect_response(
            lambda r: r.url.endswith("/consent") and r.request.method == "POST"
        ):
            page.keyboard.press("Enter")
        banner.wait_for(state="hidden")
        (record,) = rows(database, "SELECT * FROM consent_records")
        assert (record["action"], record["statistics"], record["advertising"]) == ("grant", 1, 1)
        assert record["origin"] == server.url and record["user_agent_family"] == "Chrome"
        page.reload()
        page.wait_for_load_state("load")
        assert not banner.is_visible()  # decided: the banner stays away
        # pixel.js re-sends the view once at consent, then the reload sends it again.
        after = poll(hits, lambda found: len(found) >= 4)
        assert {r["placement_id"] for r in after} == {"ad-top", "ad-side"}
        vid = next(c["value"] for c in context.cookies() if c["name"] == "kdv_vid")
        row = after[-1]
        assert row["ip"] == VISITOR_IP
        assert row["visitor_id"] == vid and len(row["session_id"]) == 32
        assert row["user_agent"] == user_agent and row["browser_family"] == "Chrome"
        assert row["os_family"] == "Linux" and row["device_class"] == "pc"
        assert row["page_url"] == f"{server.url}/demo/?utm_source=newsletter"  # token dropped
        assert row["referrer_url"].startswith("http://search.example")
        assert (row["country"], row["city"]) == ("GB", "London")
        assert (row["consent_id"], row["policy_version"]) == (record["consent_id"], "1")

        # 3. Withdraw from the footer link: the visitor cookie goes, no further hit.
        page.get_by_role("link", name="Настройки cookie").click()
        banner.wait_for(state="visible")
        with page.expect_response(
            lambda r: r.url.endswith("/consent") and r.request.method == "DELETE"
        ):
            page.get_by_role("button", name="Отозвать согласие").click()
        banner.wait_for(state="hidden")
        assert not [c for c in context.cookies() if c["name"] in ("kdv_vid", "kdv_sid")]
        before = len(hits())
        refused = counted("refused")
        page.reload()
        page.wait_for_load_state("load")
        poll(lambda: counted("refused"), lambda n: n == refused + 2)  # both pixels answered
        assert len(hits()) == before
        actions = [r["action"] for r in rows(database, "SELECT action FROM consent_records")]
        assert actions == ["grant", "withdraw"]
        assert errors == []
    finally:
        context.close()
