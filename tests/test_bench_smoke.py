"""The load benchmark's correctness check, small: nothing lost, nothing invented.

A few hundred requests of the benchmark's mix (consented and unconsented cookies, many
user agents, pages and forwarded client IPs) through a real server; every consented 200
must be exactly one stored row, and every answer one count in ``pixel_counts``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.client import drive
from bench.mix import GEOIP, build_mix
from tests.conftest import SECRET, Server, rows

pytestmark = pytest.mark.slow

REQUESTS = 400


def _wait_flushed(server: Server, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while json.loads(httpx.get(f"{server.url}/healthz").text)["queue_depth"] != 0:
        assert time.monotonic() < deadline, "writer did not drain"
        time.sleep(0.02)


async def test_bench_mix_stores_one_row_per_consented_200(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve(
        env={
            "COLLECTOR_SERVER_TRUSTED_PROXIES": "127.0.0.1/32",
            "COLLECTOR_GEOIP_CITY_DB": str(GEOIP / "GeoIP2-City-Test.mmdb"),
            "COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": "20",
        }
    )
    mix = build_mix(SECRET, visitors=60, pages=50, ips=100)
    counts = await drive("127.0.0.1", server.port, mix.requests(REQUESTS), connections=8)
    _wait_flushed(server)
    db = tmp_path / "collector.db"
    stored = rows(db, "SELECT count(*) FROM hits")[0][0]
    counted = dict(rows(db, "SELECT consent, sum(hits) FROM pixel_counts GROUP BY consent"))
    assert counts.ok == REQUESTS and counts.other_status == 0
    assert stored == counts.ok_consented == counts.sent_consented == REQUESTS * 7 // 10
    assert counted.pop("granted") == stored
    assert sum(counted.values()) == REQUESTS - stored
    assert set(counted) <= {"absent", "refused", "invalid"}
    # The forwarded addresses were used, not the proxy's.
    assert rows(db, "SELECT count(*) FROM hits WHERE ip = '127.0.0.1'")[0][0] == 0
