"""``PixelProtocol``: uvicorn's httptools protocol, with ``GET /p.gif`` answered in the
parser's callback.

Why: under uvicorn every request, however small, becomes an asyncio Task running an ASGI
cycle (a ``RequestResponseCycle``, an ``asyncio.Event``, two ``send`` awaits that
validate each header with two regexes). For a 43-byte image that machinery is most of
the cost. Measured on this project's 2-core machine, same run (docs/PERFORMANCE.md,
session 4): the bare Starlette pixel 48.1 us of server CPU per request, a raw ASGI
pixel 25.7, the same GIF written from ``on_headers_complete`` 11.6.

So when the parser has read a pixel request's headers, and nothing else is in the way,
the pixel records the hit (``Pixel.answer_now``: the same code the ASGI path runs) and
the whole response goes out in one ``write`` before the parser moves on. Everything else
-- every other route, and a pixel request that must wait -- takes uvicorn's ordinary
path, unchanged:

- a response is still in progress on this connection (pipelining keeps its order);
- the writer's buffer is full (the ASGI path waits for space: back-pressure);
- the client is not reading (the transport's write buffer is over its high-water mark);
- ``Expect: 100-continue``, an upgrade, a ``root_path``, or uvicorn's access log on;
- any method but GET and HEAD (the ASGI path answers 405), or another path.

What it keeps of uvicorn's behaviour: keep-alive and its timeout, ``Connection: close``
and HTTP/1.0 (answered, then closed), the ``date`` header (uvicorn's
``server_state.default_headers``), ``limit_max_requests`` (``total_requests``),
graceful shutdown (``shutdown()`` closes an idle connection). It relies on attributes of
``HttpToolsProtocol`` that are not public API, which is why pyproject pins uvicorn to the
minor version it was checked against; ``tests/test_protocol.py`` checks every behaviour
above through a real server.
"""

from __future__ import annotations

from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from collector.pixel import GIF, Pixel

_OK = b"HTTP/1.1 200 OK\r\n"
_CLOSE = b"connection: close\r\n"


class _Answered:
    """Stands in for the ``RequestResponseCycle`` of a request answered in the callback:
    the parser's later callbacks (a body, message complete) and ``connection_lost`` see
    a finished response, as after any completed cycle."""

    __slots__ = ()
    response_complete = True  # all uvicorn reads of a finished cycle, with message_event

    class message_event:  # named like the attribute it stands in for
        @staticmethod
        def set() -> None:
            pass


_ANSWERED = cast(RequestResponseCycle, _Answered())


class _DefaultHeaders:
    """uvicorn's default header lines (``date``), joined once per list: its server loop
    replaces the list once a second."""

    __slots__ = ("_block", "_source")

    def __init__(self) -> None:
        self._source: list[tuple[bytes, bytes]] | None = None
        self._block = b""

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        if headers is not self._source:
            # Holding the list keeps its identity from being reused by a new one.
            self._source = headers
            self._block = b"".join(b"%s: %s\r\n" % header for header in headers)
        return self._block


_defaults = _DefaultHeaders()


class PixelProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that answers the pixel in ``on_headers_complete``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pixel = getattr(self.app, "pixel", None)
        # Only our own app (uvicorn wraps it in no middleware with proxy headers off) and
        # never with an access log, whose line this path would not write.
        self._pixel = pixel if isinstance(pixel, Pixel) and not self.access_log else None

    def on_headers_complete(self) -> None:
        if self._pixel is None or not self._answer_pixel(self._pixel):
            super().on_headers_complete()

    def _answer_pixel(self, pixel: Pixel) -> bool:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return False
        if self.pipeline or self.expect_100_continue or self.root_path or self.flow.write_paused:
            return False
        parser = self.parser
        method = parser.get_method()
        if (method != b"GET" and method != b"HEAD") or parser.should_upgrade():
            return False
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            return False  # the ordinary path answers it as uvicorn does
        if url.path != b"/p.gif":
            return False
        lines = pixel.answer_now(self.headers, url.query or b"", self.client)
        if lines is None:
            return False
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        self.transport.write(
            b"".join(
                (
                    _OK,
                    _defaults.block(self.server_state.default_headers),
                    lines,
                    b"\r\n" if keep_alive else _CLOSE + b"\r\n",
                    GIF if method == b"GET" else b"",
                )
            )
        )
        self.cycle = _ANSWERED
        # Pipelined requests answered in one read: one keep-alive timer, not one each
        # (uvloop drops an overwritten timer with its handle; asyncio's loop would not).
        self._unset_keepalive_if_required()
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
        return True
