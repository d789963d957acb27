"""The analyst dashboard in headless Chromium against a real ``collector serve``.

Skipped (with the reason) where Debian's chromium is missing; with ``CI`` set a missing
browser fails instead, so CI cannot pass without running it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from collector.app import create_app
from collector.config import Settings
from collector.rollups import DAY_MS
from collector.storage.base import Batch
from tests.conftest import ROOT, Server, make_settings
from tests.test_stats import hit

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"
EVIL_PAGE = "/<script>window.__pwned=1</script>"

pytestmark = pytest.mark.browser


def _need_browser() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing and CI is set: the dashboard test must run")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); dashboard untested")


async def _seed(settings: Settings) -> dict[str, str]:
    app = create_app(settings)
    async with app.lifespan(app.starlette):
        today = int(time.time() * 1000) // DAY_MS * DAY_MS
        hits = []
        for day in range(14):
            for i in range(20 + 5 * day):
                hits.append(
                    hit(
                        today - day * DAY_MS + i * 60_000,
                        f"v{day}-{i % (8 + day)}",
                        ["/", "/catalog", "/cart", "/item/42", EVIL_PAGE][i % 5],
                        placement=["ad-top", None, "ad-side"][i % 3],
                        country=["KZ", "RU", "KZ", "UZ"][i % 4],
                        referrer=[None, "https://www.google.com/", "https://ya.ru/"][i % 3],
                        source=["web", "web", "app"][i % 3],
                        device=["mobile", "pc", "mobile", "tablet"][i % 4],
                    )
                )
        await app.storage.write_batch(Batch(hits=hits))
        day = time.strftime("%Y-%m-%d", time.gmtime(today / 1000))
        await app.storage.write_batch(
            Batch(pixel_counts={(day, "/", "granted"): 70, (day, "/", "refused"): 30})
        )
        return {
            "analyst": await app.tokens.create("ana", "analyst"),
            "engineer": await app.tokens.create("eng", "engineer"),
        }


def test_dashboard_shows_charts_and_tables_and_renders_strings_inert(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    _need_browser()
    from playwright.sync_api import sync_playwright

    tokens = asyncio.run(_seed(make_settings(tmp_path)))
    server = serve()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda d: errors.append("dialog: " + d.message))
            outside = []
            page.on(
                "request",
                lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None,
            )
            page.goto(f"{server.url}/dashboard/")
            page.fill("#token", tokens["analyst"])
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#chart canvas")
            page.wait_for_selector('.bars[data-by="page"] .bar-row:not(.bar-head)')
            assert page.text_content("#who-name") == "ana (analyst)"
            assert page.is_hidden("#engineer")
            assert page.text_content("#t-consent") == "70.0 %"
            hits_tile = page.text_content("#t-hits") or ""
            assert hits_tile.replace(",", "").isdigit() and int(hits_tile.replace(",", "")) > 500
            labels = page.locator('.bars[data-by="page"] .bar-label').all_text_contents()
            assert EVIL_PAGE in labels  # shown as text, not executed
            assert page.evaluate("window.__pwned") is None
            for by in ("referrer", "browser", "device_class", "country", "placement", "source"):
                assert page.locator(f'.bars[data-by="{by}"] .bar-label').count() >= 1, by
            page.screenshot(path=str(ARTIFACTS / "dashboard-analyst.png"), full_page=True)

            page.click("#logout")
            page.fill("#token", tokens["engineer"])
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#engineer:not([hidden])")
            # Suspicious IPs from /api/ip, then a lookup through the form (3.3.2).
            page.wait_for_selector("#ip-table tbody tr")
            assert page.text_content("#ip-error") == ""
            assert "81.2.69.142" in (page.text_content("#ip-table tbody") or "")
            page.fill("#ip", "81.2.69.142")
            page.click("#ip-form button[type=submit]")
            page.wait_for_selector("#ip-result h3")
            assert (page.text_content("#ip-result h3") or "").startswith("81.2.69.142")
            page.screenshot(path=str(ARTIFACTS / "dashboard-engineer.png"), full_page=True)
            assert errors == []
            assert outside == []
        finally:
            browser.close()
