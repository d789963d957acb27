"""The JSON API under /api: one module per audience (stats, ip, admin)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from collector.errors import InputError


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi], or a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name}: expected an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise InputError(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def page(items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"items": items, "count": len(items), **extra}
