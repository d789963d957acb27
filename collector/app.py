"""``create_app(settings)``: joins the pixel fast path, the Starlette routes and the lifespan.

``/p.gif`` is dispatched before Starlette sees the request (a raw ASGI callable, see
pixel.py); every other route is an ordinary Starlette app. Resources (storage, GeoIP
readers, the batch writer) open in the lifespan and close there, safely twice.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from collector.aggregates import aggregators
from collector.api.admin import admin_routes
from collector.api.consent import consent_routes
from collector.api.governance import governance_routes
from collector.api.ip import ip_routes
from collector.api.stats import stats_routes
from collector.audit import AuditLog
from collector.auth import ApiGuard, TokenStore
from collector.collect import collect_routes
from collector.config import Settings, load_settings, resolve_secret
from collector.consent import ConsentCodec
from collector.consent_api import ConsentApi
from collector.consent_records import ConsentRecords
from collector.enrich import Enricher
from collector.errors import CollectorError
from collector.geo import GeoIP
from collector.governance import Governance
from collector.logs import configure_logging, redact
from collector.metrics import Metrics
from collector.openapi import openapi_route
from collector.pixel import Pixel, Receive, Scope, Send
from collector.security import SecurityHeaders
from collector.storage import open_storage
from collector.writer import BatchBuilder, BatchWriter
from collector.writer_process import SOCKET_ENV, RemoteSink

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONFIG_ENV = "COLLECTOR_CONFIG"
_GEO_RELOAD_S = 5.0


class CollectorApp:
    """The ASGI application: one per settings object, no module-level state."""

    def __init__(self, settings: Settings, writer_socket: str | None = None) -> None:
        self.settings = settings = resolve_secret(settings)
        self.metrics = Metrics()
        self.storage = open_storage(settings, aggregators(settings))
        self.geoip = GeoIP(settings.geoip)
        # Enrichment happens here, in every worker (in parallel), also when a writer
        # process stores the batches (writer_process.RemoteSink).
        self.enricher = Enricher(settings, self.geoip)
        self.codec = ConsentCodec(settings.consent)
        self.writer = BatchWriter(
            self.storage,
            self.enricher,
            batch_size=settings.storage.batch_size,
            flush_interval_ms=settings.storage.flush_interval_ms,
            queue_size=settings.storage.queue_size,
            queue_wait_ms=settings.storage.queue_wait_ms,
            metrics=self.metrics,
            # Under ``collector serve`` with SQLite, one writer process stores every
            # worker's batches (writer_process.py); otherwise this process does.
            sink=RemoteSink(writer_socket, BatchBuilder(self.enricher)) if writer_socket else None,
        )
        self._geo_checked = 0.0
        spool_depth = getattr(self.storage, "spool_depth", None)
        if spool_depth is not None:
            self.metrics.spool_hits.set_function(spool_depth)
        self.writer.housekeeping.append(self._reload_geoip)
        self.pixel = Pixel(settings, self.codec, self.writer, self.metrics)
        self.audit = AuditLog(self.storage, settings.consent.secret)
        self.governance = Governance(settings, self.storage, self.audit, self.writer)
        self.tokens = TokenStore(self.storage)
        self.guard = ApiGuard(
            self.tokens,
            self.audit,
            client_ip=self.client_ip,
            on_failure=self.metrics.auth_failures.inc,
        )
        self.starlette = Starlette(
            routes=[
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
                *admin_routes(self),
                *governance_routes(self),
                *self._consent_routes(),
                *ip_routes(self),
                *collect_routes(self),
                *stats_routes(self),
                openapi_route(lambda: self.starlette.routes),
                Mount("/dashboard", StaticFiles(directory=STATIC_DIR / "dashboard", html=True)),
            ],
            exception_handlers={
                CollectorError: _collector_error,
                HTTPException: _http_error,
            },
            lifespan=self.lifespan,
        )
        self.starlette.state.collector = self
        # Outermost around Starlette (error responses included); the pixel bypasses it.
        self.web = SecurityHeaders(self.starlette)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/p.gif":
            await self.pixel(scope, receive, send)
            return
        await self.web(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.storage.open()
        self.geoip.open()
        await self.governance.start()
        await self.writer.start()
        # Everything loaded so far (parser tables, regexes, readers) lives for the whole
        # process: keep it out of the cyclic collector's scans of the hot path's garbage.
        gc.collect()
        gc.freeze()
        await self.audit.record(
            actor="system", action="server.start", detail={"config": redact(self.settings)}
        )
        logger.info(
            "collector started",
            extra={
                "pid": os.getpid(),
                "config_source": self.settings.source,
                "config": redact(self.settings),
            },
        )
        try:
            yield
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Drain the writer, then close storage and readers (safe twice)."""
        await self.writer.stop()
        await self.governance.stop()
        await self.storage.close()
        self.geoip.close()
        logger.info("collector stopped", extra={"pid": os.getpid()})

    def client_ip(self, request: Request) -> str:
        """The caller's address, by the same trusted-proxy rules as the pixel."""
        client = request.client
        return self.pixel.client_ip.resolve(
            client.host if client else None,
            request.headers.get("x-forwarded-for"),
            request.headers.get("forwarded"),
        )

    def _consent_routes(self) -> list[BaseRoute]:
        """/consent, its admin API, the static scripts, and the demo store when enabled."""
        consent = self.settings.consent
        pepper = consent.ip_pepper.encode() or self.codec.derive_key("consent-ip-hash")
        self.consent_records = ConsentRecords(self.storage, pepper)
        api = ConsentApi(
            self.settings, self.codec, self.pixel.consent, self.consent_records, self.client_ip
        )
        routes: list[BaseRoute] = [
            *api.routes(),
            *consent_routes(self),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
        if self.settings.server.demo:
            demo = StaticFiles(directory=STATIC_DIR / "demo", html=True)
            routes.append(Mount("/demo", demo, name="demo"))
        return routes

    def _reload_geoip(self) -> None:
        now = time.monotonic()
        if now - self._geo_checked >= _GEO_RELOAD_S:
            self._geo_checked = now
            self.geoip.maybe_reload()

    async def healthz(self, request: Request) -> Response:
        database = await self.storage.ping()
        healthy = database and self.writer.healthy
        body: dict[str, Any] = {
            "status": "ok" if healthy else "unhealthy",
            "database": database,
            "writer": {"healthy": self.writer.healthy, "last_error": self.writer.last_error},
            "queue_depth": self.writer.depth(),
            "geoip": self.geoip.enabled,
        }
        spool_status = getattr(self.storage, "spool_status", None)
        if spool_status is not None:
            body["spool"] = spool_status()
            if not database and self.writer.healthy:
                # Hits are kept in the local spool: this node still serves the pixel, so
                # it stays in the load balancer (200), but says it is degraded.
                body["status"] = "degraded"
                return JSONResponse(body, status_code=200)
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


async def _collector_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CollectorError)
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": "http_error", "detail": exc.detail},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def create_app(settings: Settings, writer_socket: str | None = None) -> CollectorApp:
    return CollectorApp(settings, writer_socket)


def app_from_environment() -> CollectorApp:
    """uvicorn's factory: settings from ``$COLLECTOR_CONFIG`` (if set) and the environment.

    Used by ``collector serve`` so that every worker process builds its own app.
    """
    settings = load_settings(os.environ.get(CONFIG_ENV) or None)
    configure_logging(settings.server)
    return create_app(settings, os.environ.get(SOCKET_ENV) or None)
