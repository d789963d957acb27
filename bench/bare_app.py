"""The baseline: a bare Starlette pixel that serves the same GIF and records nothing.

Same uvicorn settings as ``collector serve`` (uvloop, httptools, no access log, no proxy
headers), so the ratio collector/bare measures what recording costs, not the server.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from collector.pixel import GIF

_HEADERS = {
    "cache-control": "no-store, no-cache, must-revalidate, max-age=0",
    "x-content-type-options": "nosniff",
    "cross-origin-resource-policy": "cross-origin",
}


async def pixel(request: Request) -> Response:
    return Response(GIF, media_type="image/gif", headers=_HEADERS)


def create_app() -> Starlette:
    return Starlette(routes=[Route("/p.gif", pixel, methods=["GET", "HEAD"])])
