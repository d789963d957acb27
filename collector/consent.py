"""The consent cookie: what the visitor decided, signed so nobody else can decide for them.

Value format (cookie-safe, no quoting needed)::

    1.<consent id>.<purpose bits>.<policy version>.<issued unix s>.<HMAC-SHA256, base64url>

Purpose bits: 1 = statistics, 2 = advertising. A refusal is a signed cookie too (bits 0),
so "decided no" differs from "never asked". Tampered, unsigned, malformed, stale (older
than ``period_days``, clause 5.1) or -- with ``require_reconsent`` -- given under another
policy version (9.1-9.2) all read as no consent.

``consent.source`` can point the reader at an existing consent platform instead
(cookieconsent v3, IAB TCF v2.2, a plain cookie; decoders in consent_sources.py). Their
decisions become a synthesized ``Consent``: a consent id keyed-hashed from the cookie value
(so hits link to the exact decision without storing it), the current policy version, and
"issued now" -- the platform owns expiry and re-consent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from collector.config import ConsentSettings, VisitorSettings
from collector.consent_sources import (
    purposes_from_cookieconsent,
    purposes_from_plain,
    purposes_from_tcf,
)

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


def purposes_from_names(names: Iterable[str]) -> int:
    bits = 0
    for name in names:
        if name not in PURPOSE_BITS:
            raise ValueError(f"unknown purpose {name!r} (known: statistics, advertising)")
        bits |= PURPOSE_BITS[name]
    return bits


def cookie_attributes(visitor: VisitorSettings) -> str:
    """The attributes every cookie of ours carries (consent, visitor and session id)."""
    attrs = f"; Path=/; HttpOnly; SameSite={visitor.same_site.capitalize()}"
    if visitor.secure:
        attrs += "; Secure"
    if visitor.domain:
        attrs += f"; Domain={visitor.domain}"
    return attrs


def expiring_visitor_cookies(visitor: VisitorSettings) -> tuple[str, ...]:
    """Set-Cookie values that delete the visitor and session ids (no valid consent)."""
    attrs = cookie_attributes(visitor)
    return tuple(
        f"{name}=; Max-Age=0{attrs}" for name in (visitor.cookie_name, visitor.session_cookie_name)
    )


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

    def derive_key(self, label: str) -> bytes:
        """A key for another use (IP hashing, external consent ids), separate from signing."""
        return hmac.new(self._key, b"collector/" + label.encode("ascii"), hashlib.sha256).digest()

    def verify(self, value: str) -> Consent | None:
        """The decision signed into ``value`` whatever its age or policy version, else None.

        For GET /consent (a stale decision is still "decided", just no longer in force) and
        for chaining a new decision to the one it replaces.
        """
        return self._verify(value) if len(value) <= 160 else None

    def is_stale(self, consent: Consent) -> bool:
        """Given under an older policy version that ``require_reconsent`` no longer accepts."""
        return self.require_reconsent and consent.policy_version != self.policy_version

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
        self.source = settings.source
        self.name, self._external = _external_source(settings)
        self.cookie_names: tuple[str, ...] = (self.name,)
        self._id_key = codec.derive_key(f"external-consent-id/{self.source}")
        self._cache: dict[str, tuple[str, int] | None] = {}

    def read(self, cookies: Mapping[str, str], now: float) -> tuple[Consent | None, str]:
        raw = cookies.get(self.name)
        if raw is None:
            return None, "absent"
        if self._external is None:
            consent = self.codec.decode(raw, now)
        else:
            consent = self._read_external(raw, now)
        if consent is None:
            return None, "invalid"
        return consent, "granted" if consent.statistics else "refused"

    def _read_external(self, raw: str, now: float) -> Consent | None:
        assert self._external is not None
        try:
            decoded = self._cache[raw]
        except KeyError:
            purposes = self._external(raw)
            decoded = None
            if purposes is not None:
                digest = hmac.new(self._id_key, raw.encode("utf-8", "replace"), hashlib.sha256)
                tag = base64.urlsafe_b64encode(digest.digest()[:12]).decode("ascii")
                decoded = (f"{_ID_PREFIX[self.source]}-{tag}", purposes_from_names(purposes))
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()
            self._cache[raw] = decoded
        if decoded is None:
            return None
        return Consent(decoded[0], decoded[1], self.codec.policy_version, int(now))


_ID_PREFIX = {"cookieconsent": "cc", "tcf": "tcf", "plain": "plain"}
_Decoder = Callable[[str], "frozenset[str] | None"]


def _external_source(settings: ConsentSettings) -> tuple[str, _Decoder | None]:
    """The cookie to read and, for a consent platform, the decoder of its value."""
    if settings.source == "cookieconsent":
        categories = {c: "statistics" for c in settings.cookieconsent_statistics}
        categories.update({c: "advertising" for c in settings.cookieconsent_advertising})
        return settings.cookieconsent_cookie, lambda v: purposes_from_cookieconsent(v, categories)
    if settings.source == "tcf":
        ids = {"statistics": settings.tcf_statistics, "advertising": settings.tcf_advertising}
        return settings.tcf_cookie, lambda v: purposes_from_tcf(v, ids)
    if settings.source == "plain":
        values = {
            "statistics": settings.plain_statistics,
            "advertising": settings.plain_advertising,
        }
        return settings.plain_cookie, lambda v: purposes_from_plain(v, values)
    return settings.cookie_name, None
