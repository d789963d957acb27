"""Access rules (5.5): bearer tokens with roles, and the audited API endpoint wrapper.

Roles: ``analyst`` reads aggregated statistics only; ``engineer`` also reads IP-level
data for fraud control and troubleshooting (3.3.2); ``admin`` also runs the governance
operations (blocking, erasure, exports, audit). Tokens are 256-bit random strings shown
once; only their SHA-256 is stored (a slow hash buys nothing for random secrets), and
the lookup by hash is followed by a constant-time comparison.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from collector.audit import AuditLog
from collector.errors import AuthError, CollectorError, Forbidden, InputError, NotFound
from collector.storage.base import Storage

logger = logging.getLogger(__name__)

Role = Literal["analyst", "engineer", "admin"]
ROLES: tuple[Role, ...] = ("analyst", "engineer", "admin")
TOKEN_PREFIX = "kdv_"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """Create, list, revoke and look up API tokens."""

    def __init__(self, storage: Storage, cache_s: float = 1.0) -> None:
        self.storage = storage
        # Revocation takes effect within cache_s; lookups stay off the database otherwise.
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._cache_s = cache_s

    async def create(self, name: str, role: str) -> str:
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not _NAME.match(name):
            raise InputError("name: use 1-64 letters, digits, '.', '_', '@' or '-'")
        if await self.storage.fetch_one("SELECT 1 FROM api_tokens WHERE name = ?", [name]):
            raise InputError(f"a token named {name!r} exists already (revoke it first)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        await self.storage.execute(
            "INSERT INTO api_tokens (name, role, token_hash, prefix, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [name, role, hash_token(token), token[:10], int(time.time() * 1000)],
        )
        return token

    async def list(self) -> list[dict[str, Any]]:
        return await self.storage.fetch_all(
            "SELECT name, role, prefix, created_at, revoked_at FROM api_tokens ORDER BY id"
        )

    async def revoke(self, name: str) -> None:
        touched = await self.storage.execute(
            "UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            [int(time.time() * 1000), name],
        )
        if not touched:
            raise NotFound(f"no active token named {name!r}")
        self._cache.clear()

    async def authenticate(self, token: str) -> Principal | None:
        digest = hash_token(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached and now - cached[0] < self._cache_s:
            return cached[1]
        row = await self.storage.fetch_one(
            "SELECT name, role, token_hash FROM api_tokens "
            "WHERE token_hash = ? AND revoked_at IS NULL",
            [digest],
        )
        principal = None
        if row and hmac.compare_digest(row["token_hash"], digest):
            principal = Principal(row["name"], row["role"])
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[digest] = (now, principal)
        return principal


class FailureLimiter:
    """Failed authentication per source: rate limited, and loud when it repeats (5.5)."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, warn_after: int = 5) -> None:
        self.limit = limit
        self.window_s = window_s
        self.warn_after = warn_after
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, source: str, now: float) -> deque[float]:
        times = self._failures.setdefault(source, deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def blocked(self, source: str) -> bool:
        return len(self._recent(source, time.monotonic())) >= self.limit

    def fail(self, source: str) -> int:
        now = time.monotonic()
        times = self._recent(source, now)
        times.append(now)
        if len(self._failures) > 10_000:
            self._failures = {source: times}
        return len(times)


Endpoint = Callable[[Request, Principal], Awaitable[Response]]


class ApiGuard:
    """Wrap API endpoints: authenticate, check the role, audit the call, map errors."""

    def __init__(
        self,
        tokens: TokenStore,
        audit: AuditLog,
        client_ip: Callable[[Request], str],
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.tokens = tokens
        self.audit = audit
        self.client_ip = client_ip
        self.failures = FailureLimiter()
        self.on_failure = on_failure

    def route(
        self,
        *roles: Role,
        action: str,
        subject: Callable[[Request], str | None] = lambda r: None,
        personal: bool = False,
    ) -> Callable[[Endpoint], Callable[[Request], Awaitable[Response]]]:
        """Allow ``roles``; record ``action`` (and the subject for personal data) in the audit."""

        def decorate(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
            @functools.wraps(endpoint)
            async def wrapper(request: Request) -> Response:
                request_id = _request_id(request)
                source = self.client_ip(request)
                principal: Principal | None = None
                target: str | None = None
                try:
                    principal = await self._authenticate(request, source, action, request_id)
                    if principal.role not in roles:
                        raise Forbidden(
                            f"role {principal.role!r} may not use this route "
                            f"(needs {' or '.join(roles)})"
                        )
                    try:
                        target = subject(request)
                    except (KeyError, ValueError):
                        target = None
                    response = await endpoint(request, principal)
                except CollectorError as exc:
                    response = JSONResponse(
                        {"error": exc.code, "detail": exc.detail}, status_code=exc.status
                    )
                    if isinstance(exc, AuthError) and not isinstance(exc, Forbidden):
                        response.headers["www-authenticate"] = "Bearer"
                    if exc.status == 429:
                        response.headers["retry-after"] = str(int(self.failures.window_s))
                if principal is not None:
                    # Endpoints that find their subject in a JSON body name it here.
                    target = getattr(request.state, "audit_subject", None) or target
                    await self.audit.record(
                        actor=principal.name,
                        role=principal.role,
                        action=action,
                        subject=target if personal else None,
                        request_id=request_id,
                        outcome=str(response.status_code),
                        detail={
                            "path": request.url.path,
                            "personal_data": personal,
                            **getattr(request.state, "audit_detail", {}),
                        },
                    )
                response.headers["x-request-id"] = request_id
                return response

            return wrapper

        return decorate

    async def _authenticate(
        self, request: Request, source: str, action: str, request_id: str
    ) -> Principal:
        if self.failures.blocked(source):
            raise TooManyFailures("too many failed authentication attempts; retry later")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        principal = None
        if scheme.lower() == "bearer" and token.strip():
            principal = await self.tokens.authenticate(token.strip())
        if principal is not None:
            return principal
        count = self.failures.fail(source)
        self.on_failure()
        await self.audit.record(
            actor=f"anonymous@{source}",
            action="auth.failed",
            outcome="denied",
            request_id=request_id,
            detail={"path": request.url.path, "action": action, "token_given": bool(token)},
        )
        if count >= self.failures.warn_after:
            logger.warning(
                "unauthorised access attempt: %d failed authentications from %s in %ds",
                count,
                source,
                int(self.failures.window_s),
            )
        if not header:
            raise AuthError("missing bearer token (Authorization: Bearer <token>)")
        raise AuthError("invalid or revoked token")


class TooManyFailures(AuthError):
    status = 429
    code = "too_many_requests"


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex
