"""The consent cookie: what the visitor decided, signed so nobody else can decide for them.

Value format (cookie-safe, no quoting needed)::

    1.<consent id>.<purpose bits>.<policy version>.<issued unix s>.<HMAC-SHA256, base64url>

Purpose bits: 1 = statistics, 2 = advertising. A refusal is a signed cookie too (bits 0),
so "decided no" differs from "never asked". Tampered, unsigned, malformed, stale (older
than ``period_days``, clause 5.1) or -- with ``require_reconsent`` -- given under another
policy version (9.1-9.2) all read as no consent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from collector.config import ConsentSettings

STATISTICS = 1
ADVERTISING = 2
PURPOSE_BITS = {"statistics": STATISTICS, "advertising": ADVERTISING}

_FORMAT = re.compile(
    r"^1\.([A-Za-z0-9_-]{8,32})\.([0-3])\.([A-Za-z0-9_-]{1,32})\.(\d{1,12})\.([A-Za-z0-9_-]{43})$"
)
_MAX_CACHE = 65_536


@dataclass(frozen=True, slots=True)
class Consent:
    consent_id: str
    purposes: int
    policy_version: str
    issued_at: int

    @property
    def statistics(self) -> bool:
        return bool(self.purposes & STATISTICS)

    @property
    def advertising(self) -> bool:
        return bool(self.purposes & ADVERTISING)

    def purpose_names(self) -> list[str]:
        return [name for name, bit in PURPOSE_BITS.items() if self.purposes & bit]


def purposes_from_names(names: list[str] | tuple[str, ...]) -> int:
    bits = 0
    for name in names:
        if name not in PURPOSE_BITS:
            raise ValueError(f"unknown purpose {name!r} (known: statistics, advertising)")
        bits |= PURPOSE_BITS[name]
    return bits


class ConsentCodec:
    """Sign and verify consent values under the configured secret.

    Verification results are cached by value: a visitor sends the same cookie on every
    page, so the HMAC runs once per visitor rather than once per hit. Expiry and policy
    version are still checked on every call.
    """

    def __init__(self, settings: ConsentSettings) -> None:
        if not settings.secret:
            raise ValueError("consent secret is not set (call config.resolve_secret first)")
        self._key = settings.secret.encode("utf-8")
        self.period_s = settings.period_days * 86_400
        self.policy_version = settings.policy_version
        self.require_reconsent = settings.require_reconsent
        self._cache: dict[str, Consent | None] = {}

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def issue(self, purposes: int, *, now: float | None = None, consent_id: str = "") -> Consent:
        return Consent(
            consent_id=consent_id or secrets.token_urlsafe(12),
            purposes=purposes,
            policy_version=self.policy_version,
            issued_at=int(time.time() if now is None else now),
        )

    def encode(self, consent: Consent) -> str:
        payload = (
            f"1.{consent.consent_id}.{consent.purposes}."
            f"{consent.policy_version}.{consent.issued_at}"
        )
        return f"{payload}.{self._sign(payload)}"

    def _verify(self, value: str) -> Consent | None:
        m = _FORMAT.match(value)
        if m is None:
            return None
        payload, _, signature = value.rpartition(".")
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        return Consent(m[1], int(m[2]), m[3], int(m[4]))

    def decode(self, value: str, now: float) -> Consent | None:
        """The valid, current consent in ``value``, else None."""
        try:
            consent = self._cache[value]
        except KeyError:
            consent = self._verify(value) if len(value) <= 160 else None
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()
            self._cache[value] = consent
        if consent is None or not self.is_current(consent, now):
            return None
        return consent

    def is_current(self, consent: Consent, now: float) -> bool:
        if not (consent.issued_at - 300 <= now < consent.issued_at + self.period_s):
            return False
        return not (self.require_reconsent and consent.policy_version != self.policy_version)

    def remaining_s(self, consent: Consent, now: float) -> int:
        """Seconds until the consent lapses: the visitor cookie must not outlive it (5.1)."""
        return max(0, int(consent.issued_at + self.period_s - now))


class ConsentReader:
    """The visitor's decision, read from the request's cookies.

    The pixel asks only this: which cookies to look at (``cookie_names``) and what they
    say (``read``). External consent platforms plug in here, not in the pixel.
    States: granted (statistics allowed), refused, absent (no decision), invalid.
    """

    def __init__(self, settings: ConsentSettings, codec: ConsentCodec) -> None:
        self.codec = codec
        self.name = settings.cookie_name
        self.cookie_names: tuple[str, ...] = (settings.cookie_name,)

    def read(self, cookies: Mapping[str, str], now: float) -> tuple[Consent | None, str]:
        raw = cookies.get(self.name)
        if raw is None:
            return None, "absent"
        consent = self.codec.decode(raw, now)
        if consent is None:
            return None, "invalid"
        return consent, "granted" if consent.statistics else "refused"
