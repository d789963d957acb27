"""Turning request facts into stored facts: client IP, URLs, user agent, geo.

Everything here is pure and cached where the input repeats (user agents, IPs), because
it runs once per hit. The pixel itself only gathers raw facts; the batch writer calls
``Enricher.row`` off the request path (Shynet's lesson: enrich after answering).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ua_parser import Parser, load_builtins, regex
from user_agents.parsers import UserAgent, parse_browser, parse_device, parse_operating_system

from collector.app_device import app_device
from collector.config import PrivacySettings, Settings
from collector.geo import GeoInfo, GeoIP
from collector.storage.base import HitRow, RawHit

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# ``HitRow(...)`` runs namedtuple's generated ``__new__`` (a Python-level call with 29
# arguments) for every stored hit; the same tuple, built directly (as pixel.py does).
_tuple = tuple.__new__
# App screens are stored as app://<screen name> in page_url (POST /collect).
APP_SCHEME = "app://"
_EMAIL = re.compile(r"[^\s/?#&=@]+@[^\s/?#&=@]+\.[A-Za-z]{2,}")
# A path segment or value that looks like a secret rather than a word: long runs of
# hex, base64url without word separators, or a JWT. Slugs ("oak-table-2000") survive.
_TOKEN = re.compile(
    r"^(?:[0-9a-fA-F]{24,}|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_.-]+|(?=[A-Za-z0-9_]*\d[A-Za-z0-9_]*\d)"
    r"(?=[A-Za-z0-9_]*[A-Za-z][A-Za-z0-9_]*[A-Za-z])[A-Za-z0-9_+/=]{24,})$"
)

# Families that ua-parser does not mark as Spider but that no person browses with.
_SCRIPT_FAMILIES = frozenset(
    {
        "curl",
        "Wget",
        "Python Requests",
        "Python-urllib",
        "Go-http-client",
        "HeadlessChrome",
        "PhantomJS",
        "Java",
        "okhttp",
        "Apache-HttpClient",
        "libwww-perl",
        "aiohttp",
        "httpx",
    }
)


# --- client IP -----------------------------------------------------------------------

# Resolved proxy headers, memoised: real ones are a few dozen bytes; longer ones are
# parsed every time, so a full cache of hostile headers stays under ~20 MB.
_CHAIN_CACHE = 65_536
_CHAIN_CACHE_KEY = 128


def normalize_ip(text: str) -> str | None:
    """Canonical text of an address, IPv4-mapped IPv6 folded to IPv4; None if invalid."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class ClientIP:
    """Resolve the visitor's address from the socket peer and trusted proxy headers.

    Only a peer inside ``trusted_proxies`` may speak for someone else; its headers are read
    right to left, skipping further trusted proxies, so a client cannot spoof its address
    by prepending entries. A malformed header is ignored as a whole.
    """

    def __init__(self, trusted_proxies: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in trusted_proxies]
        self._peer_cache: dict[str, tuple[str, bool]] = {}
        # Headers repeat per visitor (every page, every ad block); parsing them with
        # ipaddress costs microseconds per request on the hot path.
        self._chain_cache: dict[tuple[str | None, str | None], str | None] = {}

    def _is_trusted(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self._networks)

    def _peer(self, peer: str) -> tuple[str, bool]:
        cached = self._peer_cache.get(peer)
        if cached is None:
            ip = normalize_ip(peer) or "0.0.0.0"
            cached = (ip, bool(self._networks) and self._is_trusted(ip))
            if len(self._peer_cache) > 4096:
                self._peer_cache.clear()
            self._peer_cache[peer] = cached
        return cached

    def resolve(self, peer: str | None, xff: str | None, forwarded: str | None) -> str:
        ip, trusted = self._peer(peer or "0.0.0.0")
        if not trusted or not (xff or forwarded):
            return ip
        if len(xff or "") + len(forwarded or "") > _CHAIN_CACHE_KEY:
            client = self._from_headers(xff, forwarded)
            return ip if client is None else client
        key = (xff, forwarded)
        try:
            client = self._chain_cache[key]
        except KeyError:
            client = self._from_headers(xff, forwarded)
            if len(self._chain_cache) >= _CHAIN_CACHE:
                self._chain_cache.clear()
            self._chain_cache[key] = client
        return ip if client is None else client

    def _from_headers(self, xff: str | None, forwarded: str | None) -> str | None:
        """The client named by the proxy headers, or None to fall back to the peer."""
        chain = _parse_xff(xff) if xff else None
        if chain is None and forwarded:
            chain = _parse_forwarded(forwarded)
        if not chain:
            return None
        for hop in reversed(chain):
            if not self._is_trusted(hop):
                return hop
        return chain[0]


def _parse_xff(value: str) -> list[str] | None:
    if len(value) > 2048:
        return None
    hops = []
    for part in value.split(","):
        ip = normalize_ip(part)
        if ip is None:
            return None
        hops.append(ip)
    return hops


def _parse_forwarded(value: str) -> list[str] | None:
    """RFC 7239 ``for=`` values, ports and brackets removed; None when malformed."""
    if len(value) > 2048:
        return None
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            key, _, val = pair.strip().partition("=")
            if key.lower() != "for":
                continue
            val = val.strip().strip('"')
            if val.startswith("["):
                val = val[1 : val.find("]")] if "]" in val else ""
            elif val.count(":") == 1:
                val = val.partition(":")[0]
            ip = normalize_ip(val)
            if ip is None:
                return None
            hops.append(ip)
    return hops


# --- URLs ------------------------------------------------------------------------------


def _scrub(text: str) -> str:
    """Replace e-mail addresses and token-like strings in one URL component."""
    decoded = unquote(text)
    if "@" in decoded:
        decoded = _EMAIL.sub("[email]", decoded)
    if _TOKEN.match(decoded):
        return "[token]"
    return decoded


class UrlSanitizer:
    """Cap, strip and scrub URLs so storage never holds secrets that rode in on them.

    Fragments, credentials and every query parameter outside the allowlist go; what is
    left is scrubbed of e-mail addresses and token-like values (path segments too).
    """

    def __init__(self, privacy: PrivacySettings) -> None:
        self._allow = tuple(privacy.url_query_allowlist)
        self._max = privacy.max_url_length
        self.clean = lru_cache(maxsize=16_384)(self._clean)
        # The writer asks for the path of every hit (the anonymous counters); pages repeat.
        self.path = lru_cache(maxsize=16_384)(self._path)

    def _allowed(self, key: str) -> bool:
        return any(fnmatchcase(key, pattern) for pattern in self._allow)

    def _clean(self, raw: str) -> str | None:
        raw = _CONTROL.sub("", raw.strip())[: self._max * 4]
        if not raw:
            return None
        if raw.startswith(APP_SCHEME):
            return _clean_screen(raw[len(APP_SCHEME) :], self._max)
        try:
            parts = urlsplit(raw)
            host = (parts.hostname or "").lower()
            port = parts.port
        except ValueError:
            return None
        if parts.scheme.lower() not in ("http", "https") or not host:
            return None
        netloc = f"{host}:{port}" if port else host
        path = "/".join(
            quote(_scrub(seg), safe="[]@:!$&'()*+,;=-._~") for seg in parts.path.split("/")
        )
        query = urlencode(
            [
                (k, _scrub(v))
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
                if self._allowed(k)
            ]
        )
        cleaned = urlunsplit((parts.scheme.lower(), netloc, path or "/", query, ""))
        return cleaned[: self._max]

    def _path(self, raw: str) -> str:
        """The path alone, for the anonymous counter; '(none)' when there is no page."""
        cleaned = self.clean(raw) if raw else None
        if cleaned is None:
            return "(none)"
        if cleaned.startswith(APP_SCHEME):
            return cleaned[:256]
        return urlsplit(cleaned).path[:256] or "/"


def _clean_screen(name: str, limit: int) -> str | None:
    """An app screen name, scrubbed per '/'-segment like a URL path (no secrets stored)."""
    segments = [_scrub(seg.strip()) for seg in name.split("/")]
    cleaned = "/".join(seg for seg in segments if seg)
    return f"{APP_SCHEME}{cleaned}"[:limit] if cleaned else None


def referrer_domain(url: str | None) -> str:
    if not url:
        return "(direct)"
    try:
        return (urlsplit(url).hostname or "(direct)").lower()
    except ValueError:
        return "(direct)"


# --- user agent ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Browser:
    family: str
    version: str
    os_family: str
    os_version: str
    device_family: str
    device_brand: str
    device_class: str  # mobile, tablet, pc, bot, other

    @property
    def is_bot(self) -> bool:
        return self.device_class == "bot"


def _version(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def make_ua_parser(cache_size: int = 16_384) -> Callable[[str], Browser]:
    """A cached parser: ua-parser-rs resolves, user-agents' rules classify the device.

    ``user_agents.parse`` goes through ua-parser's legacy pure-Python regexes (~0.5 ms per
    new string); the Rust resolver answers in tens of microseconds, and the LRU cache makes
    repeated strings nearly free. The device class keeps user-agents' published rules by
    feeding its ``UserAgent`` the fast result.
    """
    parser = Parser(regex.Resolver(load_builtins()))

    @lru_cache(maxsize=cache_size)
    def parse(ua: str) -> Browser:
        result = parser.parse(ua)
        b, o, d = result.user_agent, result.os, result.device
        agent = UserAgent.__new__(UserAgent)
        agent.ua_string = ua
        agent.browser = parse_browser(
            b.family if b else "Other", *((b.major, b.minor, b.patch) if b else ())
        )
        agent.os = parse_operating_system(
            o.family if o else "Other", *((o.major, o.minor, o.patch) if o else ())
        )
        agent.device = parse_device(
            d.family if d else "Other", d.brand if d else None, d.model if d else None
        )
        family = agent.browser.family
        if agent.is_bot or family in _SCRIPT_FAMILIES or family.endswith(("bot", "Bot")):
            device_class = "bot"
        elif agent.is_tablet:
            device_class = "tablet"
        elif agent.is_mobile:
            device_class = "mobile"
        elif agent.is_pc:
            device_class = "pc"
        else:
            device_class = "other"
        return Browser(
            family=family,
            version=_version(b.major, b.minor, b.patch) if b else "",
            os_family=agent.os.family,
            os_version=_version(o.major, o.minor, o.patch) if o else "",
            device_family=agent.device.family,
            device_brand=d.brand or "" if d else "",
            device_class=device_class,
        )

    return parse


# --- the writer's step ---------------------------------------------------------------


_Agent = tuple[str, str, str, str, str, str, str, str]


class Enricher:
    """Build the stored row for a consented hit (runs in the batch writer, not the request)."""

    def __init__(self, settings: Settings, geoip: GeoIP) -> None:
        self.urls = UrlSanitizer(settings.privacy)
        self.ua = make_ua_parser()
        self.geoip = geoip
        self._max_ua = settings.privacy.max_user_agent_length
        # Raw header -> the stored columns for it: one dict lookup per hit for repeat
        # agents instead of a regex pass, a slice and a second cache lookup.
        self._agent = lru_cache(maxsize=16_384)(self._agent_columns)

    def geo(self, ip: str) -> GeoInfo:
        return self.geoip.lookup(ip)

    def _agent_columns(self, raw: str) -> _Agent:
        ua = _CONTROL.sub("", raw)[: self._max_ua]
        b = self.ua(ua)
        return (
            ua,
            b.family,
            b.version,
            b.os_family,
            b.os_version,
            b.device_family,
            b.device_brand,
            b.device_class,
        )

    def _app_agent(self, agent: _Agent, hit: RawHit) -> _Agent:
        """An app's own declaration beats its HTTP client's UA (see app_device.py)."""
        ua, family, version, os_family, os_version, dev_family, brand, dev_class = agent
        if hit.os_name or hit.device_model:
            d = app_device(self.ua, hit.os_name or "", hit.os_version or "", hit.device_model or "")
            return (ua, family, version, *d)
        if dev_class == "bot" and hit.source == "app":
            # An app that declares nothing still is an app, not its HTTP library (okhttp).
            return (ua, family, version, os_family, os_version, dev_family, brand, "mobile")
        return agent

    def row(self, hit: RawHit) -> HitRow:
        # Runs on the event loop for every consented hit, so it is written for speed:
        # cached lookups and one positional tuple in HIT_COLUMNS order.
        geo = self.geoip.lookup(hit.ip)
        clean = self.urls.clean
        placement = hit.placement
        agent = self._agent(hit.user_agent)
        if hit.source != "web":
            agent = self._app_agent(agent, hit)
        return _tuple(
            HitRow,
            (
                hit.ts_ms,
                hit.ip,
                hit.visitor_id,
                hit.session_id,
                _cookie_json(hit.cookies) if hit.cookies else None,
                *agent,
                clean(hit.page) if hit.page else None,
                clean(hit.referrer) if hit.referrer else None,
                (_CONTROL.sub("", placement)[:128] or None) if placement else None,
                geo.country,
                geo.region,
                geo.city,
                hit.consent_id,
                hit.policy_version,
                hit.source,
                hit.event_id,
                hit.event_type,
                hit.client_ts_ms,
                hit.received_ms,
                hit.time_flag,
                hit.app_version,
                hit.device_model,
            ),
        )


def _cookie_json(cookies: Iterable[tuple[str, str]]) -> str | None:
    items: dict[str, Any] = {name: _CONTROL.sub("", value)[:256] for name, value in cookies}
    return json.dumps(items, ensure_ascii=False, sort_keys=True) if items else None
