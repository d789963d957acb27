"""Security headers on every response that is not the pixel (6.2.3, 5.5).

A plain ASGI middleware around the Starlette app: it adds a strict Content-Security-Policy
(no inline scripts or styles, no framing, no foreign connections), ``nosniff``,
``X-Frame-Options`` and a ``Referrer-Policy`` to each ``http.response.start``. A header
the route set itself wins, so a page with a real need can loosen its own policy openly.
The pixel is served before this middleware and keeps its own headers (it must be
embeddable cross-origin).

Referrer policy: ``no-referrer`` for the API and the dashboard (their URLs can carry IPs
and visitor ids, 1.1.2); the demo shop page uses ``strict-origin-when-cross-origin`` so the
pixel it embeds can fall back to the ``Referer`` header like on a real store page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_COMMON: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
_STRICT_REFERRER = (b"referrer-policy", b"no-referrer")
_PAGE_REFERRER = (b"referrer-policy", b"strict-origin-when-cross-origin")


class SecurityHeaders:
    """Add the security headers to every HTTP response of ``app``."""

    def __init__(self, app: ASGIApp, page_prefixes: tuple[str, ...] = ("/demo",)) -> None:
        self.app = app
        self.page_prefixes = page_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        referrer = _PAGE_REFERRER if path.startswith(self.page_prefixes) else _STRICT_REFERRER
        extra = (*_COMMON, referrer)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in extra if h[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
