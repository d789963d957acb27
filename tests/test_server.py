"""A real ``collector serve`` process on loopback: cookies, shutdown, no lost hits."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from collector.config import load_settings
from collector.consent import ConsentCodec
from tests.conftest import SECRET, Server, rows

pytestmark = pytest.mark.slow


def cookie_for(purposes: int = 1) -> str:
    settings = load_settings(None, environ={"COLLECTOR_CONSENT_SECRET": SECRET})
    codec = ConsentCodec(settings.consent)
    return f"kdv_consent={codec.encode(codec.issue(purposes))}"


def test_real_server_sets_and_reuses_the_visitor_cookie(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve()
    name, _, value = cookie_for().partition("=")
    with httpx.Client(base_url=server.url, cookies={name: value}) as browser:
        first = browser.get("/p.gif", params={"u": "https://s.kz/a"})
        assert first.status_code == 200 and first.headers["content-type"] == "image/gif"
        vid = browser.cookies["kdv_vid"]
        browser.get("/p.gif", params={"u": "https://s.kz/b"})
        assert browser.cookies["kdv_vid"] == vid
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean exit
    stored = rows(
        tmp_path / "collector.db", "SELECT visitor_id, page_url, ip FROM hits ORDER BY id"
    )
    assert [tuple(r) for r in stored] == [
        (vid, "https://s.kz/a", "127.0.0.1"),
        (vid, "https://s.kz/b", "127.0.0.1"),
    ]
    log = server.log.read_text()
    assert value not in log and SECRET not in log  # no cookie or secret in the logs


async def _load(url: str, cookie: str, stop: asyncio.Event, progress: list[int]) -> tuple[int, int]:
    """Send consented hits until the server goes away; count the 200s."""
    answered = errors = 0
    async with httpx.AsyncClient(base_url=url, headers={"cookie": cookie}, timeout=5) as client:
        while not stop.is_set():
            try:
                resp = await client.get("/p.gif", params={"u": f"https://s.kz/{answered}"})
            except httpx.HTTPError:
                errors += 1
                if errors > 20:
                    return answered, errors
                await asyncio.sleep(0.01)
                continue
            if resp.status_code == 200:
                answered += 1
                progress[0] += 1
    return answered, errors


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_loses_no_answered_hit(
    serve: Callable[..., Server], tmp_path: Path, workers: int
) -> None:
    # A long flush interval keeps many hits in memory when the signal arrives.
    server = serve(
        env={"COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": "2000"}, args=["--workers", str(workers)]
    )
    stop = asyncio.Event()
    cookie = cookie_for()
    progress = [0]
    tasks = [asyncio.create_task(_load(server.url, cookie, stop, progress)) for _ in range(16)]
    # Signal only once the load is really flowing (the machine may be busy).
    deadline = time.monotonic() + 30
    while progress[0] < 300 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while server.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    results = await asyncio.gather(*tasks)
    answered = sum(a for a, _ in results)
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean exit
    stored = rows(tmp_path / "collector.db", "SELECT count(*) FROM hits")[0][0]
    print(f"workers={workers} answered={answered} stored={stored}")
    assert answered > 100
    assert stored == answered
