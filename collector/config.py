"""Settings: frozen dataclasses loaded once from TOML and ``COLLECTOR_<SECTION>_<KEY>``.

Defaults live here and only here; ``config.example.toml`` documents each key. Loading
validates everything up front so that a bad key stops the process at start with one
line naming it (exit code 2), never halfway through serving traffic.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import secrets
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from collector.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "COLLECTOR_"
_POLICY_VERSION = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DOMAIN = re.compile(r"^\.?[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*$")
# scheme://host[:port], no path or trailing slash: compared verbatim with the Origin header.
_ORIGIN = re.compile(r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # Peers allowed to set X-Forwarded-For / Forwarded. Empty: headers are ignored.
    trusted_proxies: tuple[str, ...] = ()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = False
    # Answer GET/HEAD /p.gif inside uvicorn's parser callback (collector/protocol.py):
    # 29% less CPU per pixel request (docs/PERFORMANCE.md). Off: the ordinary ASGI path.
    fast_path: bool = True
    # Seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive).
    # Behind a load balancer, set it above the balancer's own idle timeout.
    keep_alive_s: int = 5
    # Serve the demo store page at /demo/ (``collector serve --demo``).
    demo: bool = False


@dataclass(frozen=True, slots=True)
class StorageSettings:
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: str = "collector.db"
    dsn: str = ""
    # Hits per write transaction at most; a write starts when this many wait, else after
    # flush_interval_ms (which alone bounds what a crash can lose). Larger transactions
    # cost less per hit (index pages written once, rollup keys shared): the writer
    # process spent 21% less CPU per request at 8,000 than at 2,000 (docs/PERFORMANCE.md).
    batch_size: int = 8000
    flush_interval_ms: int = 200
    # ~1.2 KB a hit: 20,000 bound the backlog to ~25 MB (about 2 s of a core's peak
    # traffic); the process's resident memory stays under 200 MB when overloaded.
    queue_size: int = 20_000
    # How long a pixel request may wait for queue space (back-pressure while the writer is
    # behind) before its hit is dropped; while storage is failing it does not wait.
    queue_wait_ms: int = 1000
    # SQLite under ``collector serve``: one separate process stores every worker's batches,
    # so SQLite's work leaves the cores that answer pixels (docs/PERFORMANCE.md).
    writer_process: bool = True
    # The writer process (the file's only writer) sums the rollups and IP statistics of
    # up to this many consecutive batches before it writes them: their keys repeat
    # across batches, so each costs less per hit (docs/PERFORMANCE.md, session 5).
    # 1: every batch writes its own. A crash loses nothing: the next writer aggregates
    # those hits from the stored rows.
    aggregate_batches: int = 8
    # ... and for at most this long (then it ends, whether or not a batch follows): under
    # sustained load the aggregates (dashboard, statistics API) lag the hits by up to
    # this much and one write; a window nothing follows ends within 0.5 s. At the bench's
    # load a window of 1 s held ~12,000 hits and cost the writer 23.5 µs a request, one
    # of 2 s 21.5 (docs/PERFORMANCE.md, session 9).
    aggregate_max_age_ms: int = 2000
    # PostgreSQL only: connections per process, connect/statement timeout, daily hits
    # partitions created ahead, and the local spool that holds batches while it is down.
    pool_size: int = 10
    connect_timeout_ms: int = 5000
    partition_days_ahead: int = 7
    spool_dir: str = "collector-spool"
    spool_retry_ms: int = 1000


@dataclass(frozen=True, slots=True)
class ConsentSettings:
    cookie_name: str = "kdv_consent"
    secret: str = ""
    period_days: int = 365  # 5.1: processing lasts for the period stated in the consent
    policy_version: str = "1"  # 9.1-9.2: every consent records the version it was given under
    allowed_origins: tuple[str, ...] = ()
    require_reconsent: bool = False
    honor_dnt: bool = False
    # Where the decision is read from: our own signed cookie, or an existing consent platform.
    source: Literal["cookie", "cookieconsent", "tcf", "plain"] = "cookie"
    cookieconsent_cookie: str = "cc_cookie"
    cookieconsent_statistics: tuple[str, ...] = ("analytics",)  # categories granting statistics
    cookieconsent_advertising: tuple[str, ...] = ("marketing",)
    tcf_cookie: str = "euconsent-v2"
    tcf_statistics: tuple[int, ...] = (1, 8, 9)  # TCF purposes that must all be consented
    tcf_advertising: tuple[int, ...] = (1, 2, 3, 4, 7)
    plain_cookie: str = "cookie_consent"
    plain_statistics: tuple[str, ...] = ("all", "statistics")  # values granting statistics
    plain_advertising: tuple[str, ...] = ("all", "advertising")
    # Key for the IP hash in consent records; empty: derived from ``secret``.
    ip_pepper: str = ""
    # 5.1, 5.5: proofs of consent are deleted this many days after the decision; 0 means
    # period_days + the hits' retention, so a proof outlives every hit recorded under it.
    records_retention_days: int = 0


@dataclass(frozen=True, slots=True)
class VisitorSettings:
    cookie_name: str = "kdv_vid"
    session_cookie_name: str = "kdv_sid"
    session_idle_minutes: int = 30
    secure: bool = True
    domain: str = ""
    # "none" when the store and the collector are different sites (needs secure = true).
    same_site: Literal["lax", "none"] = "lax"


@dataclass(frozen=True, slots=True)
class GeoipSettings:
    city_db: str = ""
    asn_db: str = ""
    anonymous_db: str = ""
    cache_size: int = 8192  # a miss costs ~1.3 us (C reader): memory matters more


@dataclass(frozen=True, slots=True)
class PrivacySettings:
    url_query_allowlist: tuple[str, ...] = ("utm_*",)
    cookie_allowlist: tuple[str, ...] = ()
    max_url_length: int = 2048
    max_user_agent_length: int = 512


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    # 5.1: raw hits live at most this many days; 0 means consent.period_days.
    days: int = 0
    mode: Literal["delete", "depersonalise"] = "delete"
    # How often a running server applies retention; 0 leaves it to `collector purge`.
    interval_minutes: float = 60.0
    chunk_size: int = 1000


@dataclass(frozen=True, slots=True)
class IpstatsSettings:
    # 3.3.2: per-IP security counters for requests without statistics consent. Off by
    # default; see docs/IP-STATISTICS.md for why.
    without_consent: bool = False
    without_consent_days: int = 7


@dataclass(frozen=True, slots=True)
class FraudSettings:
    """Thresholds of the fraud rules (collector/fraud.py); a rule fires at or above."""

    burst_per_minute: int = 60
    visitors_per_ip: int = 20
    ips_per_visitor: int = 5
    bot_hits: int = 1
    user_agents_per_ip: int = 8
    anonymous_network: bool = True
    countries_per_visitor: int = 3
    no_page_hits: int = 5
    network_factor: int = 4
    verify_crawler_asn: bool = False


@dataclass(frozen=True, slots=True)
class CollectSettings:
    """``POST /collect``: batched app and server-side events (see collector/collect/)."""

    enabled: bool = True
    max_events: int = 100  # events per batch
    max_bytes: int = 262_144  # request body
    max_age_hours: int = 72  # older client times are clamped and flagged 'stale'
    max_future_s: int = 60  # client clocks ahead by more than this: clamped, flagged 'future'
    dedupe_hours: int = 72  # (app instance, event id) seen within this window counts once
    rate_per_instance: int = 60  # batches per minute per app instance; 0 = unlimited
    rate_per_ip: int = 600  # batches per minute per client IP; 0 = unlimited


@dataclass(frozen=True, slots=True)
class StatsSettings:
    # 3.4, 6.2.2: groups with fewer distinct visitors are merged into "other"
    min_visitors: int = 5


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    consent: ConsentSettings = field(default_factory=ConsentSettings)
    visitor: VisitorSettings = field(default_factory=VisitorSettings)
    geoip: GeoipSettings = field(default_factory=GeoipSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    ipstats: IpstatsSettings = field(default_factory=IpstatsSettings)
    fraud: FraudSettings = field(default_factory=FraudSettings)
    collect: CollectSettings = field(default_factory=CollectSettings)
    stats: StatsSettings = field(default_factory=StatsSettings)
    # Where the settings came from, for the start-up log line; not a config key.
    source: str = field(default="defaults", compare=False)

    def secret_path(self) -> Path:
        """The file that holds a generated consent secret: beside the database."""
        db = Path(self.storage.path)
        return db.with_name(db.name + ".secret")


SECTIONS: dict[str, type[Any]] = {
    f.name: f.type if isinstance(f.type, type) else globals()[str(f.type)]
    for f in dataclasses.fields(Settings)
    if f.name != "source"
}


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read TOML (if given), apply environment overrides, validate; raise ConfigError."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        source = str(path)
    environ = os.environ if environ is None else environ
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = raw.pop(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        sections[name] = _build_section(name, cls, table, environ)
    if raw:
        raise ConfigError(f"unknown config section [{sorted(raw)[0]}]")
    settings = Settings(**sections, source=source)
    _validate(settings)
    return settings


def _build_section(
    name: str, cls: type[Any], table: dict[str, Any], environ: Mapping[str, str]
) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"{name}.{key}: unknown key")
        values[key] = _coerce(f"{name}.{key}", hints[key], value, from_env=False)
    for key, hint in hints.items():
        env_key = f"{ENV_PREFIX}{name.upper()}_{key.upper()}"
        if env_key in environ:
            values[key] = _coerce(env_key, hint, environ[env_key], from_env=True)
    return cls(**values)


def _coerce(where: str, hint: Any, value: Any, *, from_env: bool) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if from_env and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if from_env and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is tuple:
        if from_env and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if typing.get_args(hint)[0] is int:
            return _int_tuple(where, value, from_env=from_env)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    if origin is dict or origin is types.GenericAlias:  # pragma: no cover - not used yet
        return value
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")  # pragma: no cover


def _int_tuple(where: str, value: Any, *, from_env: bool) -> tuple[int, ...]:
    if from_env and isinstance(value, list):  # already split on commas
        try:
            return tuple(int(part) for part in value)
        except ValueError:
            raise ConfigError(f"{where}: expected integers, got {value!r}") from None
    if isinstance(value, list) and all(type(v) is int for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a list of integers, got {value!r}")


def _validate(s: Settings) -> None:
    def positive(where: str, value: int) -> None:
        if value <= 0:
            raise ConfigError(f"{where}: must be greater than zero, got {value}")

    positive("server.port", s.server.port)
    if s.server.port > 65535:
        raise ConfigError(f"server.port: must be at most 65535, got {s.server.port}")
    positive("server.workers", s.server.workers)
    for cidr in s.server.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                f"server.trusted_proxies: {cidr!r} is not an IP network (CIDR)"
            ) from None
    positive("storage.batch_size", s.storage.batch_size)
    positive("storage.aggregate_batches", s.storage.aggregate_batches)
    positive("storage.aggregate_max_age_ms", s.storage.aggregate_max_age_ms)
    positive("storage.flush_interval_ms", s.storage.flush_interval_ms)
    positive("storage.queue_size", s.storage.queue_size)
    if s.storage.queue_wait_ms < 0:
        raise ConfigError("storage.queue_wait_ms: must not be negative")
    if s.storage.backend == "sqlite" and not s.storage.path:
        raise ConfigError("storage.path: must name the SQLite database file")
    if s.storage.backend == "postgres" and not s.storage.dsn:
        raise ConfigError("storage.dsn: required when storage.backend is postgres")
    positive("storage.pool_size", s.storage.pool_size)
    positive("storage.connect_timeout_ms", s.storage.connect_timeout_ms)
    positive("storage.spool_retry_ms", s.storage.spool_retry_ms)
    if s.storage.partition_days_ahead < 0:
        raise ConfigError("storage.partition_days_ahead: must not be negative")
    positive("consent.period_days", s.consent.period_days)
    _validate_records_retention(s)
    if not _POLICY_VERSION.match(s.consent.policy_version):
        raise ConfigError(
            "consent.policy_version: use 1-32 letters, digits, '-' or '_', "
            f"got {s.consent.policy_version!r}"
        )
    if s.consent.secret and len(s.consent.secret) < 16:
        raise ConfigError("consent.secret: must be at least 16 characters (or empty to generate)")
    _validate_consent_sources(s.consent)
    if s.visitor.same_site == "none" and not s.visitor.secure:
        raise ConfigError("visitor.same_site: 'none' requires visitor.secure = true")
    for where, name in (
        ("consent.cookie_name", s.consent.cookie_name),
        ("consent.cookieconsent_cookie", s.consent.cookieconsent_cookie),
        ("consent.tcf_cookie", s.consent.tcf_cookie),
        ("consent.plain_cookie", s.consent.plain_cookie),
        ("visitor.cookie_name", s.visitor.cookie_name),
        ("visitor.session_cookie_name", s.visitor.session_cookie_name),
    ):
        if not _COOKIE_NAME.match(name):
            raise ConfigError(f"{where}: not a valid cookie name: {name!r}")
    if s.visitor.domain and not _DOMAIN.match(s.visitor.domain):
        # It goes verbatim into every Set-Cookie header the pixel writes.
        raise ConfigError(f"visitor.domain: not a valid cookie domain: {s.visitor.domain!r}")
    positive("server.keep_alive_s", s.server.keep_alive_s)
    positive("visitor.session_idle_minutes", s.visitor.session_idle_minutes)
    positive("geoip.cache_size", s.geoip.cache_size)
    if s.privacy.max_url_length < 64:
        raise ConfigError("privacy.max_url_length: must be at least 64")
    positive("privacy.max_user_agent_length", s.privacy.max_user_agent_length)
    if s.retention.days < 0:
        raise ConfigError("retention.days: must not be negative (0 = consent.period_days)")
    if s.retention.interval_minutes < 0:
        raise ConfigError("retention.interval_minutes: must not be negative (0 = off)")
    positive("retention.chunk_size", s.retention.chunk_size)
    positive("ipstats.without_consent_days", s.ipstats.without_consent_days)
    for key in FraudSettings.__dataclass_fields__:
        value = getattr(s.fraud, key)
        if not isinstance(value, bool):
            positive(f"fraud.{key}", value)

    for key in ("max_events", "max_bytes", "max_age_hours", "max_future_s", "dedupe_hours"):
        positive(f"collect.{key}", getattr(s.collect, key))
    for key in ("rate_per_instance", "rate_per_ip"):
        if getattr(s.collect, key) < 0:
            raise ConfigError(f"collect.{key}: must not be negative (0 = unlimited)")

    positive("stats.min_visitors", s.stats.min_visitors)


def _validate_records_retention(s: Settings) -> None:
    kept = s.consent.records_retention_days
    needed = s.consent.period_days + (s.retention.days or s.consent.period_days)
    if kept < 0:
        raise ConfigError("consent.records_retention_days: must not be negative (0 = derived)")
    if 0 < kept < needed:
        raise ConfigError(
            f"consent.records_retention_days: at least {needed} (consent.period_days + the "
            "hits' retention.days), or a proof would go before the hits recorded under it"
        )


def _validate_consent_sources(c: ConsentSettings) -> None:
    both = set(c.cookieconsent_statistics) & set(c.cookieconsent_advertising)
    if both:
        raise ConfigError(
            f"consent.cookieconsent_advertising: category {sorted(both)[0]!r} is already "
            "mapped to statistics (each category maps to one purpose)"
        )
    for where, ids in (
        ("consent.tcf_statistics", c.tcf_statistics),
        ("consent.tcf_advertising", c.tcf_advertising),
    ):
        if not ids or any(not 1 <= i <= 24 for i in ids):
            raise ConfigError(f"{where}: list TCF purpose ids between 1 and 24, got {list(ids)}")
    for origin in c.allowed_origins:
        if not _ORIGIN.match(origin):
            raise ConfigError(
                f"consent.allowed_origins: {origin!r} is not an origin like https://shop.example"
            )
    if c.ip_pepper and len(c.ip_pepper) < 16:
        raise ConfigError("consent.ip_pepper: must be at least 16 characters (or empty)")


def resolve_secret(settings: Settings) -> Settings:
    """Return settings whose consent secret is set, generating one beside the database.

    The generated secret is written with mode 0600 so that several workers (and the CLI's
    ``consent-cookie``) share it; a warning says where it is, since losing it invalidates
    every consent cookie issued so far.
    """
    if settings.consent.secret:
        return settings
    path = settings.secret_path()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text(encoding="ascii").strip()
        if len(secret) < 16:
            raise ConfigError(
                f"consent.secret: the secret file {path} is empty or damaged"
            ) from None
    except OSError as exc:
        raise ConfigError(f"consent.secret: cannot create {path}: {exc.strerror}") from None
    else:
        secret = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secret + "\n")
        logger.warning(
            "no consent.secret configured: generated one and stored it in %s (mode 0600); "
            "keep that file, losing it invalidates every consent cookie",
            path,
        )
    consent = dataclasses.replace(settings.consent, secret=secret)
    return dataclasses.replace(settings, consent=consent)
