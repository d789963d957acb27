"""The OpenAPI 3.0 description of ``POST /collect``, for ``/openapi.json``.

``OPENAPI`` maps the path to its path item; ``SCHEMAS`` are the components it refers to
(``#/components/schemas/...``); routes.py registers both with ``collector.openapi``.
3.0 like the rest of the document: ``nullable``, not ``"type": [..., "null"]``.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
# Free text: at most 8192 characters, with something besides blanks and control characters
# (those are stripped, and an empty screen or page counts as absent).
_TEXT = {"type": "string", "maxLength": 8192, "pattern": r"[^\s\x00-\x1f\x7f]"}
_SHORT = {"type": "string", "pattern": r"^[A-Za-z0-9 ._+()-]{1,32}$"}
_MODEL = {"type": "string", "pattern": r"^[A-Za-z0-9 ,._+()-]{1,64}$"}
_DEVICE: dict[str, Any] = {
    "app_version": {**_SHORT, "description": "App version, e.g. 3.2.1"},
    "os": {**_SHORT, "description": "iOS, iPadOS, Android, ..."},
    "os_version": _SHORT,
    "device_model": {**_MODEL, "description": "e.g. iPhone14,2 or SM-G991B"},
}

SCHEMAS: dict[str, Any] = {
    "CollectEvent": {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "time"],
        "properties": {
            "id": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9_.:-]{1,64}$",
                "description": "Client-generated, unique per app instance (a UUID); retries "
                "with the same id within collect.dedupe_hours count once.",
            },
            "type": {
                "type": "string",
                "enum": ["page_view", "screen_view", "ad_impression"],
                "description": "Default: screen_view with screen, page_view with page.",
            },
            "time": {
                "oneOf": [
                    {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": 10**14 - 1,
                        "description": "unix milliseconds",
                    },
                    {"type": "string", "format": "date-time", "maxLength": 40},
                ],
                "description": "Client time. Stored as client_ts_ms; the hit time is clamped "
                "into [receive - collect.max_age_hours, receive] and flagged.",
            },
            "screen": {
                **_TEXT,
                "description": "App screen name; stored as app://<screen>.",
            },
            "page": {
                **_TEXT,
                "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
                "description": "http(s) URL (server, webview).",
            },
            "referrer": {**_TEXT, "description": "Previous URL or previous screen name."},
            "placement": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9 ._:/-]{1,128}$",
                "description": "Ad-block id; required for ad_impression; stored only with "
                "advertising consent and without Sec-GPC: 1 (4.1.11).",
            },
            **_DEVICE,
        },
        "allOf": [
            # Exactly one of screen or page (both present match both branches).
            {"oneOf": [{"required": ["screen"]}, {"required": ["page"]}]},
            # An ad_impression names its placement.
            {
                "anyOf": [
                    {"properties": {"type": {"enum": ["page_view", "screen_view"]}}},
                    {"required": ["placement"]},
                ]
            },
        ],
        "description": "Exactly one of screen or page; ad_impression needs placement.",
    },
    "CollectBatch": {
        "type": "object",
        "additionalProperties": False,
        "required": ["instance_id", "events"],
        "properties": {
            "instance_id": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9_-]{8,64}$",
                "description": "App-instance id (the app's kdv_vid), or the visitor id for "
                "server-side reports. Stored as visitor_id only with statistics consent.",
            },
            "session_id": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{8,64}$"},
            "source": {"type": "string", "enum": ["app", "server"], "default": "app"},
            **{k: {**v, "description": "Default for every event"} for k, v in _DEVICE.items()},
            "events": {
                "type": "array",
                "minItems": 1,
                "maxItems": 100,
                "description": "At most collect.max_events (default 100).",
                "items": {"$ref": "#/components/schemas/CollectEvent"},
            },
        },
    },
    "CollectEventResult": {
        "type": "object",
        "required": ["index", "status"],
        "properties": {
            "index": {"type": "integer"},
            "id": _STR,
            "status": {
                "type": "string",
                "enum": ["stored", "duplicate", "not_recorded", "rejected", "retry"],
            },
            "time_flag": {"type": "string", "enum": ["future", "stale"]},
            "field": _STR,
            "detail": _STR,
        },
    },
    "CollectResult": {
        "type": "object",
        "properties": {
            "consent": {"type": "string", "enum": ["granted", "refused", "absent", "invalid"]},
            "received": {"type": "integer"},
            "stored": {"type": "integer"},
            "duplicate": {"type": "integer"},
            "not_recorded": {"type": "integer"},
            "rejected": {"type": "integer"},
            "retry": {"type": "integer"},
            "results": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/CollectEventResult"},
            },
        },
    },
    "CollectError": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": _STR,
            "detail": _STR,
            "index": {"type": "integer", "nullable": True, "description": "The event at fault"},
            "field": {"type": "string", "nullable": True, "description": "The field at fault"},
        },
    },
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}

OPENAPI: dict[str, Any] = {
    "/collect": {
        "post": {
            "operationId": "collect",
            "tags": ["collection"],
            "summary": "Batched app and server-side events under the pixel's consent gate",
            "description": (
                "Events are recorded only with a valid statistics consent in X-Consent (the "
                "kdv_consent cookie value, or the token POST /consent returns to apps); "
                "otherwise only the anonymous per-page counters move. Client IP is taken "
                "through server.trusted_proxies, like the pixel. Body may be gzip-encoded."
            ),
            "parameters": [
                {
                    "name": "X-Consent",
                    "in": "header",
                    "schema": _STR,
                    "description": "Signed consent token (format of the kdv_consent cookie)",
                },
                {
                    "name": "Sec-GPC",
                    "in": "header",
                    "schema": {"type": "string", "enum": ["1"]},
                    "description": "Global Privacy Control: placement ids are not stored",
                },
            ],
            "requestBody": {"required": True, "content": _json("CollectBatch")},
            "responses": {
                "200": {"description": "Every event handled", "content": _json("CollectResult")},
                "207": {
                    "description": "Some events rejected (see results), the rest handled",
                    "content": _json("CollectResult"),
                },
                "400": {
                    "description": "Malformed JSON, bad batch, or every event rejected; "
                    "index and field name the first problem",
                    "content": _json("CollectError"),
                },
                "404": {
                    "description": "Collection is switched off (collect.enabled = false)",
                    "content": _json("CollectError"),
                },
                "413": {
                    "description": "Body or event count too large",
                    "content": _json("CollectError"),
                },
                "415": {
                    "description": "Unsupported Content-Encoding",
                    "content": _json("CollectError"),
                },
                "429": {
                    "description": "Rate limit per IP or per app instance",
                    "headers": _RETRY_AFTER,
                    "content": _json("CollectError"),
                },
                "503": {
                    "description": "Write queue full: events with status retry may be resent",
                    "headers": _RETRY_AFTER,
                    "content": _json("CollectResult"),
                },
            },
        }
    }
}
