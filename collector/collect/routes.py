"""``POST /collect``: batched app and server-side events through the pixel's consent gate.

The steps, in order, each able to end the request: per-IP rate limit (429) -> body size
(413, by Content-Length and while reading) -> JSON (400) -> batch shape (400/413) ->
per-instance rate limit (429) -> consent from ``X-Consent`` -> per-event validation ->
deduplication -> the same BatchWriter as the pixel. Enrichment (geo, device, URL
scrubbing) happens in the writer, off the request, exactly as for ``/p.gif``.

Answer: 200 when every event was handled (stored, duplicate or not recorded for lack of
consent), 207 when some events were rejected and the others handled, 400 when all were
rejected, 503 + Retry-After when the write queue was full (those events are 'retry' and
their dedupe keys released). The body always lists every event's status by index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector import openapi
from collector.collect.dedupe import Deduper
from collector.collect.events import Batch, BatchError, Event, Rejected, parse_batch
from collector.collect.openapi import OPENAPI, SCHEMAS
from collector.collect.ratelimit import RateLimiter, retry_after
from collector.consent import Consent
from collector.storage.base import AnonHit, RawHit

if TYPE_CHECKING:
    from collector.app import CollectorApp

logger = logging.getLogger(__name__)

CONSENT_HEADER = "x-consent"


class _Reject(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        field: str | None = None,
        wait_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {"error": error, "detail": detail}
        self.body.update(index=None, field=field)
        self.headers = {"retry-after": retry_after(wait_s)} if wait_s is not None else None


class Collector:
    """The endpoint's state: limits, dedupe keys and metrics, one per app."""

    def __init__(self, app: CollectorApp) -> None:
        self.app = app
        self.settings = s = app.settings.collect
        self.dedupe = Deduper(app.storage, s.dedupe_hours * 3_600_000)
        self.by_ip = RateLimiter(s.rate_per_ip)
        self.by_instance = RateLimiter(s.rate_per_instance)
        self.honor_dnt = app.settings.consent.honor_dnt
        registry = app.metrics.registry
        self._events = Counter(
            "collector_collect_events",
            "Events received on POST /collect, by outcome",
            ["status"],
            registry=registry,
        )
        self._batches = Counter(
            "collector_collect_batches",
            "Batches received on POST /collect, by HTTP status",
            ["code"],
            registry=registry,
        )

    async def endpoint(self, request: Request) -> Response:
        try:
            status, body, headers = await self._handle(request)
        except _Reject as reject:
            status, body, headers = reject.status, reject.body, reject.headers
        self._batches.labels(str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    async def _handle(self, request: Request) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        s = self.settings
        if not s.enabled:
            raise _Reject(404, "not_found", "POST /collect is disabled (collect.enabled)")
        ip = self.app.client_ip(request)
        wait = self.by_ip.take(ip)
        if wait:
            raise _Reject(429, "rate_limited", "too many batches from this address", wait_s=wait)
        raw = await self._read_body(request)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Reject(400, "bad_request", f"malformed JSON: {exc}") from None
        now = time.time()
        received_ms = int(now * 1000)
        try:
            batch = parse_batch(data, received_ms, s)
        except BatchError as exc:
            error = "too_large" if exc.status == 413 else "bad_request"
            raise _Reject(exc.status, error, exc.detail, field=exc.field) from None
        wait = self.by_instance.take(batch.instance_id)
        if wait:
            detail = "too many batches from this app instance"
            raise _Reject(429, "rate_limited", detail, wait_s=wait)
        consent, state = self._consent(request, now)
        results: dict[int, dict[str, Any]] = {}
        for item in batch.events:
            if isinstance(item, Rejected):
                results[item.index] = {
                    "index": item.index,
                    "status": "rejected",
                    "field": item.field,
                    "detail": item.detail,
                }
        events = [e for e in batch.events if isinstance(e, Event)]
        if events:
            first: dict[str, Event] = {}
            for event in events:
                if event.event_id in first:
                    results[event.index] = _result(event, "duplicate")
                else:
                    first[event.event_id] = event
            unique = list(first.values())
            if consent is not None and consent.statistics:
                await self._record(request, ip, batch, unique, consent, received_ms, results)
            else:
                self._count_anonymously(batch, unique, state, received_ms, results)
        ordered = [results[i] for i in sorted(results)]
        tally: dict[str, int] = {}
        for r in ordered:
            tally[r["status"]] = tally.get(r["status"], 0) + 1
        for name, n in tally.items():
            self._events.labels(name).inc(n)
        body: dict[str, Any] = {
            "consent": state,
            "received": len(ordered),
            **{k: tally.get(k, 0) for k in ("stored", "duplicate", "not_recorded", "rejected")},
            "results": ordered,
        }
        if tally.get("retry"):
            body["retry"] = tally["retry"]
            return 503, body, {"retry-after": "1"}
        if not events:
            bad = ordered[0]
            detail = f"no valid events; event {bad['index']}: {bad['field']}: {bad['detail']}"
            return 400, {"error": "bad_request", "detail": detail, **_where(bad), **body}, None
        return (207 if tally.get("rejected") else 200), body, None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_bytes
        too_large = f"the body exceeds collect.max_bytes ({limit} bytes)"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _Reject(413, "too_large", too_large)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise _Reject(415, "unsupported_encoding", "Content-Encoding: gzip or none")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a lying or absent Content-Length (chunked upload)
                raise _Reject(413, "too_large", too_large)
            chunks.append(chunk)
        body = b"".join(chunks)
        if encoding == "gzip":
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                body = inflate.decompress(body, limit + 1)
            except zlib.error as exc:
                raise _Reject(400, "bad_request", f"malformed gzip body: {exc}") from None
            if len(body) > limit:  # the limit applies to what we parse, too (gzip bombs)
                raise _Reject(413, "too_large", too_large)
        return body

    def _consent(self, request: Request, now: float) -> tuple[Consent | None, str]:
        """The same states as the pixel's cookie (consent.ConsentReader)."""
        raw = request.headers.get(CONSENT_HEADER)
        if raw is None:
            return None, "absent"
        consent = self.app.codec.decode(raw.strip(), now)
        if consent is None:
            return None, "invalid"
        return consent, "granted" if consent.statistics else "refused"

    def _gpc(self, request: Request) -> bool:
        h = request.headers
        return h.get("sec-gpc", "").strip() == "1" or (
            self.honor_dnt and h.get("dnt", "").strip() == "1"
        )

    async def _record(
        self,
        request: Request,
        ip: str,
        batch: Batch,
        events: list[Event],
        consent: Consent,
        received_ms: int,
        results: dict[int, dict[str, Any]],
    ) -> None:
        claimed = await self.dedupe.claim(
            batch.instance_id, [e.event_id for e in events], received_ms
        )
        # 4.1.11: ad-block attribution only with advertising consent and never against GPC.
        ads = consent.advertising and not self._gpc(request)
        ua = request.headers.get("user-agent", "")
        refused: list[str] = []
        for event in events:
            if event.event_id not in claimed:
                results[event.index] = _result(event, "duplicate")
                continue
            hit = RawHit(
                event.ts_ms,
                ip,
                ua,
                event.page,
                event.referrer,
                event.placement if ads else "",
                batch.instance_id,
                batch.session_id or _day_session(batch.instance_id, event.ts_ms),
                consent.consent_id,
                consent.policy_version,
                (),
                source=batch.source,
                event_id=event.event_id,
                event_type=event.event_type,
                client_ts_ms=event.client_ts_ms,
                received_ms=received_ms,
                time_flag=event.time_flag,
                app_version=event.app_version,
                os_name=event.os_name,
                os_version=event.os_version,
                device_model=event.device_model,
            )
            if await self.app.writer.put(hit):
                results[event.index] = _result(event, "stored")
            else:
                refused.append(event.event_id)
                results[event.index] = _result(event, "retry")
        if refused:
            await self.dedupe.release(batch.instance_id, refused)

    def _count_anonymously(
        self,
        batch: Batch,
        events: list[Event],
        state: str,
        received_ms: int,
        results: dict[int, dict[str, Any]],
    ) -> None:
        """No statistics consent: only the anonymous per-page counter moves (3.3, 4.1)."""
        for event in events:
            if self.dedupe.claim_anonymous(batch.instance_id, event.event_id, received_ms):
                self.app.writer.put_nowait(AnonHit(event.ts_ms, event.page, state))
                results[event.index] = {
                    "index": event.index,
                    "id": event.event_id,
                    "status": "not_recorded",
                }
            else:
                results[event.index] = _result(event, "duplicate")


def _result(event: Event, status: str) -> dict[str, Any]:
    result: dict[str, Any] = {"index": event.index, "id": event.event_id, "status": status}
    if event.time_flag and status == "stored":
        result["time_flag"] = event.time_flag
    return result


def _where(result: dict[str, Any]) -> dict[str, Any]:
    return {"index": result["index"], "field": result["field"]}


def _day_session(instance_id: str, ts_ms: int) -> str:
    """A session id when the app sends none: one per instance and UTC day."""
    key = f"{instance_id}:{ts_ms // 86_400_000}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def collect_routes(app: CollectorApp) -> list[Route]:
    collector = Collector(app)
    return [Route("/collect", collector.endpoint, methods=["POST"])]


for _path, _item in OPENAPI.items():
    openapi.register_path(_path, _item, SCHEMAS)
