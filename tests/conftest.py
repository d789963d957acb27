"""Shared fixtures: real SQLite files in tmp_path, the real PostgreSQL, the real ASGI app,
real servers.

PostgreSQL tests use the server named by ``$COLLECTOR_TEST_PG_DSN`` (default: the local
one); each gets a fresh schema that is dropped afterwards. Without a server they skip,
saying so, except under ``$CI``, where they fail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
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


PG_DSN_ENV = "COLLECTOR_TEST_PG_DSN"
PG_DSN = os.environ.get(PG_DSN_ENV) or "postgresql://postgres@127.0.0.1:5432/postgres"


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from sync code, off any running event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def with_schema(dsn: str, schema: str) -> str:
    """The DSN with ``search_path`` set (asyncpg passes unknown parameters to the server)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL DSN for tests; skip (fail under $CI) when nothing answers there."""

    async def probe() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
        await conn.close()

    try:
        run_sync(probe())
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL not reachable at {PG_DSN} (set {PG_DSN_ENV}): {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return PG_DSN


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """A DSN whose search_path is a fresh schema of its own, dropped after the test."""
    schema = f"test_{secrets.token_hex(6)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_sync(run(f"CREATE SCHEMA {schema}"))
    yield with_schema(pg_server, schema)
    run_sync(run(f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test once per storage backend."""
    return str(request.param)


def backend_overrides(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> dict[str, Any]:
    """``storage`` settings for ``backend`` (PostgreSQL: a fresh schema, a spool in tmp_path)."""
    if backend == "sqlite":
        return {}
    return {
        "backend": "postgres",
        "dsn": request.getfixturevalue("pg_dsn"),
        "spool_dir": str(tmp_path / "spool"),
        "partition_days_ahead": 1,  # fewer CREATE TABLEs per test
    }


@pytest.fixture
def backend_settings(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Settings:
    """Like ``settings``, on each backend in turn."""
    return make_settings(
        tmp_path,
        storage=backend_overrides(tmp_path, backend, request),
        geoip={"city_db": str(GEOIP / "GeoIP2-City-Test.mmdb")},
    )


@pytest.fixture
async def backend_app(backend_settings: Settings) -> AsyncIterator[CollectorApp]:
    application = create_app(backend_settings)
    async with application.lifespan(application.starlette):
        yield application


@pytest.fixture
async def backend_client(backend_app: CollectorApp) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(backend_app) as c:
        yield c


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
