"""Shared fixtures: real SQLite files in tmp_path, the real ASGI app, real servers."""

from __future__ import annotations

import dataclasses
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.app import CollectorApp, create_app
from collector.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
GEOIP = SHARED / "geoip"
UA_DIR = SHARED / "ua"
SECRET = "test-secret-0123456789abcdef"
IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 14_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/14.0 Mobile/15E148 Safari/604.1"
)


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for a test: a database in tmp_path, a fixed secret, overrides per section."""
    base = load_settings(
        None,
        environ={
            "COLLECTOR_STORAGE_PATH": str(tmp_path / "collector.db"),
            "COLLECTOR_CONSENT_SECRET": SECRET,
            "COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": "20",
            "COLLECTOR_VISITOR_SECURE": "false",
            "COLLECTOR_SERVER_LOG_FORMAT": "text",
        },
    )
    replaced = {
        name: dataclasses.replace(getattr(base, name), **values)
        for name, values in sections.items()
    }
    return dataclasses.replace(base, **replaced)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, geoip={"city_db": str(GEOIP / "GeoIP2-City-Test.mmdb")})


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[CollectorApp]:
    application = create_app(settings)
    async with application.lifespan(application.starlette):
        yield application


def client_for(app: CollectorApp, ip: str = "81.2.69.142") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
async def client(app: CollectorApp) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as c:
        yield c


def consent_value(app: CollectorApp, purposes: int = 3, **kw: Any) -> str:
    return app.codec.encode(app.codec.issue(purposes, **kw))


def rows(db: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read the real database file the way an operator would."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real ``collector serve`` process on 127.0.0.1."""

    def __init__(self, cwd: Path, env: dict[str, str], port: int, args: list[str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = cwd / f"server-{port}.log"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collector", "serve", "--port", str(port), *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real servers; each is stopped (SIGTERM) at the end of the test."""
    started: list[Server] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None) -> Server:
        full = {
            **os.environ,
            "COLLECTOR_STORAGE_PATH": str(tmp_path / "collector.db"),
            "COLLECTOR_CONSENT_SECRET": SECRET,
            "COLLECTOR_VISITOR_SECURE": "false",
            **(env or {}),
        }
        server = Server(tmp_path, full, free_port(), args or [])
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()
