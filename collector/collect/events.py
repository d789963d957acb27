"""Parsing a ``POST /collect`` batch into events, with no I/O (unit-testable, 3.3).

A batch is one app instance's (or, server-side, one visitor's) events. Problems with the
batch itself are a ``BatchError``; problems with one event reject that event only and name
its index and field, so a client can fix its SDK and still have the good events counted.
Client times are facts reported by an untrusted clock: kept as ``client_ts_ms`` and
clamped into [receive - max_age, receive] for ``ts_ms``, flagged when that happened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from collector.config import CollectSettings

EventType = Literal["page_view", "screen_view", "ad_impression"]
EVENT_TYPES: tuple[str, ...] = ("page_view", "screen_view", "ad_impression")
SOURCES: tuple[str, ...] = ("app", "server")

_INSTANCE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_EVENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_SHORT = re.compile(r"^[A-Za-z0-9 ._+()-]{1,32}$")
_MODEL = re.compile(r"^[A-Za-z0-9 ,._+()-]{1,64}$")
_PLACEMENT = re.compile(r"^[A-Za-z0-9 ._:/-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_TEXT = 8192
# Declared device facts may come per batch (defaults) or per event.
_DEVICE_FIELDS = {"app_version": _SHORT, "os": _SHORT, "os_version": _SHORT, "device_model": _MODEL}
_BATCH_FIELDS = frozenset({"instance_id", "session_id", "source", "events", *_DEVICE_FIELDS})
_EVENT_FIELDS = frozenset(
    {"id", "type", "time", "screen", "page", "referrer", "placement", *_DEVICE_FIELDS}
)


class BatchError(Exception):
    """The batch as a whole is unusable (400); ``field`` names what is wrong."""

    def __init__(self, field: str | None, detail: str, *, status: int = 400) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail
        self.status = status


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    field: str
    detail: str


@dataclass(frozen=True, slots=True)
class Event:
    index: int
    event_id: str
    event_type: str
    client_ts_ms: int
    ts_ms: int  # the time we store: client time clamped to the plausible window
    time_flag: str | None  # None, 'future' or 'stale'
    page: str  # an http(s) URL, or app://<screen>
    referrer: str
    placement: str
    app_version: str | None
    os_name: str | None
    os_version: str | None
    device_model: str | None


@dataclass(frozen=True, slots=True)
class Batch:
    instance_id: str
    session_id: str | None
    source: str
    events: list[Event | Rejected]


class _Bad(Exception):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


def clamp_time(client_ms: int, received_ms: int, s: CollectSettings) -> tuple[int, str | None]:
    """The stored time for a client time, and why it was changed (if it was).

    Clocks a little ahead (``max_future_s``) are ordinary drift: the receive time is
    stored without a flag. Further ahead is 'future'; older than ``max_age_hours`` is
    'stale' and pinned to the window's edge, so a broken clock cannot rewrite old days.
    """
    if client_ms > received_ms:
        flag = "future" if client_ms > received_ms + s.max_future_s * 1000 else None
        return received_ms, flag
    oldest = received_ms - s.max_age_hours * 3_600_000
    if client_ms < oldest:
        return oldest, "stale"
    return client_ms, None


def parse_batch(data: Any, received_ms: int, s: CollectSettings) -> Batch:
    if not isinstance(data, dict):
        raise BatchError(None, "the body must be a JSON object with instance_id and events")
    for key in data:
        if key not in _BATCH_FIELDS:
            raise BatchError(str(key)[:64], f"unknown field {str(key)[:64]!r}")
    instance = data.get("instance_id")
    if not isinstance(instance, str) or not _INSTANCE.fullmatch(instance):
        raise BatchError("instance_id", "required: 8-64 letters, digits, '-' or '_'")
    session = data.get("session_id")
    if session is not None and (not isinstance(session, str) or not _INSTANCE.fullmatch(session)):
        raise BatchError("session_id", "8-64 letters, digits, '-' or '_'")
    source = data.get("source", "app")
    if source not in SOURCES:
        raise BatchError("source", f"must be one of {', '.join(SOURCES)}")
    defaults: dict[str, str] = {}
    for name, pattern in _DEVICE_FIELDS.items():
        try:
            value = _pattern(data, name, pattern)
        except _Bad as bad:
            raise BatchError(bad.field, bad.detail) from None
        if value is not None:
            defaults[name] = value
    events = data.get("events")
    if not isinstance(events, list) or not events:
        raise BatchError("events", "required: a non-empty list of events")
    if len(events) > s.max_events:
        raise BatchError(
            "events", f"at most {s.max_events} events per batch, got {len(events)}", status=413
        )
    parsed: list[Event | Rejected] = []
    for index, raw in enumerate(events):
        try:
            parsed.append(_event(index, raw, defaults, received_ms, s))
        except _Bad as bad:
            parsed.append(Rejected(index, bad.field, bad.detail))
    return Batch(instance, session, source, parsed)


def _event(
    index: int, raw: Any, defaults: dict[str, str], received_ms: int, s: CollectSettings
) -> Event:
    if not isinstance(raw, dict):
        raise _Bad("", "an event must be a JSON object")
    for key in raw:
        if key not in _EVENT_FIELDS:
            raise _Bad(str(key)[:64], f"unknown field {str(key)[:64]!r}")
    event_id = raw.get("id")
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise _Bad("id", "required: 1-64 letters, digits, '.', ':', '-' or '_' (e.g. a UUID)")
    client_ms = _time(raw.get("time"))
    screen, page = _text(raw, "screen"), _text(raw, "page")
    if bool(screen) == bool(page):
        raise _Bad("screen" if screen else "page", "exactly one of screen or page is required")
    if page and not page.lower().startswith(("http://", "https://")):
        raise _Bad("page", "must be an http(s) URL (use screen for app screens)")
    referrer = _text(raw, "referrer")
    if referrer and not referrer.lower().startswith(("http://", "https://", "app://")):
        referrer = f"app://{referrer}"  # the previous screen
    placement = _pattern(raw, "placement", _PLACEMENT) or ""
    event_type = raw.get("type", "screen_view" if screen else "page_view")
    if event_type not in EVENT_TYPES:
        raise _Bad("type", f"must be one of {', '.join(EVENT_TYPES)}")
    if event_type == "ad_impression" and not placement:
        raise _Bad("placement", "required for an ad_impression")
    device = {
        name: _pattern(raw, name, pattern) or defaults.get(name)
        for name, pattern in _DEVICE_FIELDS.items()
    }
    ts_ms, flag = clamp_time(client_ms, received_ms, s)
    return Event(
        index=index,
        event_id=event_id,
        event_type=event_type,
        client_ts_ms=client_ms,
        ts_ms=ts_ms,
        time_flag=flag,
        page=page or f"app://{screen}",
        referrer=referrer,
        placement=placement,
        app_version=device["app_version"],
        os_name=device["os"],
        os_version=device["os_version"],
        device_model=device["device_model"],
    )


def _time(value: Any) -> int:
    """Unix milliseconds (integer) or ISO 8601 with a time zone."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < 10**14:
            raise _Bad("time", "unix milliseconds out of range")
        return value
    if isinstance(value, str) and len(value) <= 40:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                raise _Bad("time", "ISO 8601 time needs a time zone (e.g. Z)")
            return int(parsed.timestamp() * 1000)
    raise _Bad("time", "required: unix milliseconds or ISO 8601 with a time zone")


def _text(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise _Bad(name, f"must be a string of at most {_MAX_TEXT} characters")
    return _CONTROL.sub("", value).strip()


def _pattern(raw: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _Bad(name, f"must match {pattern.pattern}")
    return value
