"""Logging, configured once: JSON lines in production, plain text on a terminal.

Named loggers (``logging.getLogger(__name__)``) everywhere; nothing here knows about
requests, so nothing here can leak a cookie or a token. Secrets are redacted by
``redact`` before any settings object is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from collector.config import ServerSettings, Settings

_SECRET_KEYS = ("secret", "dsn", "password", "token", "pepper")


def configure_logging(server: ServerSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if server.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(server.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Access lines carry client IPs and page URLs (personal data, 1.1.2): off unless asked.
    access = logging.getLogger("uvicorn.access")
    access.disabled = not server.access_log
    # uvicorn decides per connection from hasHandlers() whether to format an access line
    # (client address, quoted path) before the logger drops it: without a handler in
    # reach it skips that work on every request.
    access.propagate = server.access_log
    # aiosqlite's debug lines print every statement's bound parameters: whole hit rows
    # (IPs, visitor ids, 1.1.2) and token hashes. Never below INFO, whatever log_level says.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))


def redact(settings: Settings) -> dict[str, Any]:
    """The effective settings as a dict, every secret-like value replaced by '***'."""

    def clean(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if any(word in key for word in _SECRET_KEYS) and value:
            return "***"
        return value

    return {k: v for k, v in clean(dataclasses.asdict(settings)).items()}
