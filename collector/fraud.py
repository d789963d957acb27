"""Fraud rules over one IP's (or network's) statistics for one day (3.3.2, 4.1.4).

Each rule has a name, a threshold from ``[fraud]`` in the config, a weight and an
explanation an engineer can act on; an IP's score is the sum of the weights of the
rules that fired, capped at 100. Known search-engine and link-preview crawlers are
reported in ``crawler`` and not scored as fraud: their traffic is wanted, and a pure
crawler IP scores 0. With ``verify_crawler_asn`` a crawler user agent only counts as a
crawler from its owner's autonomous system (user agents are trivially forged).

Pure: no I/O. ``collector.ipreport`` gathers the inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collector.config import FraudSettings
from collector.geo import GeoInfo

# User-agent family prefix -> words one of which the ASN organisation must contain.
CRAWLERS: dict[str, tuple[str, ...]] = {
    "Googlebot": ("google",),
    "Google-InspectionTool": ("google",),
    "AdsBot-Google": ("google",),
    "bingbot": ("microsoft",),
    "BingPreview": ("microsoft",),
    "YandexBot": ("yandex",),
    "YandexMobileBot": ("yandex",),
    "Baiduspider": ("baidu",),
    "Yahoo! Slurp": ("yahoo", "oath"),
    "DuckDuckBot": ("duckduckgo", "microsoft"),
    "Applebot": ("apple",),
    "SeznamBot": ("seznam",),
    "PetalBot": ("huawei",),
    "FacebookBot": ("facebook", "meta"),
    "Twitterbot": ("twitter", "x corp"),
    "LinkedInBot": ("linkedin", "microsoft"),
    "Pinterestbot": ("pinterest",),
}


def crawler_of(family: str) -> str | None:
    """The known crawler a user-agent family belongs to, or None."""
    for prefix in CRAWLERS:
        if family.startswith(prefix):
            return prefix
    return None


@dataclass(slots=True)
class DayStats:
    """What the rules read: one subject's statistics for one UTC day."""

    hits: int = 0
    bot_hits: int = 0
    no_page_hits: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    peak_per_minute: int = 0
    visitors: int = 0
    user_agents: int = 0
    ips: int = 0
    countries: list[str] = field(default_factory=list)
    bot_families: list[str] = field(default_factory=list)
    max_ips_per_visitor: int = 0
    max_countries_per_visitor: int = 0
    # Requests without statistics consent ([ipstats] without_consent), IP scope only.
    unconsented_hits: int = 0
    unconsented_bot_hits: int = 0
    unconsented_crawler_hits: int = 0
    unconsented_peak: int = 0


@dataclass(frozen=True, slots=True)
class Signal:
    rule: str
    explanation: str
    value: Any
    threshold: Any

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "explanation": self.explanation,
            "value": self.value,
            "threshold": self.threshold,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    score: int
    signals: tuple[Signal, ...]
    crawler: str | None

    @property
    def rules(self) -> list[str]:
        return [s.rule for s in self.signals]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    weight: int
    setting: str  # the [fraud] key holding the threshold
    scaled: bool  # multiplied by network_factor for /24 and /48 networks
    measure: Callable[[DayStats, GeoInfo], Any]
    explain: str  # format string with {value} and {threshold}


def _anonymous(geo: GeoInfo) -> str:
    kinds = [
        name
        for name, flag in (
            ("Tor exit node", geo.is_tor_exit_node),
            ("VPN", geo.is_anonymous_vpn),
            ("public proxy", geo.is_public_proxy),
            ("residential proxy", geo.is_residential_proxy),
            ("hosting provider", geo.is_hosting_provider),
        )
        if flag
    ]
    if not kinds and geo.is_anonymous:
        kinds.append("anonymous network")
    return ", ".join(kinds)


RULES: tuple[Rule, ...] = (
    Rule(
        "burst_rate",
        35,
        "burst_per_minute",
        True,
        lambda s, g: max(s.peak_per_minute, s.unconsented_peak),
        "{value} hits in one minute (threshold {threshold}): faster than a person browses; "
        "typical of click fraud or a scripted burst.",
    ),
    Rule(
        "many_visitors",
        30,
        "visitors_per_ip",
        True,
        lambda s, g: s.visitors,
        "{value} distinct visitor ids from one address (threshold {threshold}): a client "
        "that drops its cookies on every request, or many devices behind one NAT.",
    ),
    Rule(
        "many_ips",
        20,
        "ips_per_visitor",
        False,
        lambda s, g: s.max_ips_per_visitor,
        "a visitor id seen here used {value} addresses in one day (threshold {threshold}): "
        "a cookie shared or replayed across machines, or rotating proxies.",
    ),
    Rule(
        "bot_user_agent",
        30,
        "bot_hits",
        True,
        lambda s, g: s.bot_hits + s.unconsented_bot_hits,
        "{value} hits with a bot or script user agent that is not a known search-engine "
        "crawler (threshold {threshold}).",
    ),
    Rule(
        "ua_churn",
        20,
        "user_agents_per_ip",
        True,
        lambda s, g: s.user_agents,
        "{value} distinct user agents from one address (threshold {threshold}): user-agent "
        "rotation, as bot farms do to look like many browsers.",
    ),
    Rule(
        "anonymous_network",
        25,
        "anonymous_network",
        False,
        lambda s, g: _anonymous(g),
        "the address belongs to an anonymising or hosting network ({value}); people rarely "
        "shop from data centres or through Tor.",
    ),
    Rule(
        "country_hopping",
        20,
        "countries_per_visitor",
        False,
        lambda s, g: s.max_countries_per_visitor,
        "a visitor id seen here appeared from {value} countries in one day "
        "(threshold {threshold}): impossible travel, a shared or stolen cookie.",
    ),
    Rule(
        "no_page",
        15,
        "no_page_hits",
        True,
        lambda s, g: s.no_page_hits,
        "{value} hits carried no page address and no referrer (threshold {threshold}): the "
        "pixel was requested directly, not from a store page.",
    ),
)


def _fires(value: Any, threshold: Any) -> bool:
    if isinstance(threshold, bool):
        return bool(threshold and value)
    return bool(value) and value >= threshold


def verify_crawler(name: str, geo: GeoInfo) -> bool:
    org = (geo.as_org or "").lower()
    return any(word in org for word in CRAWLERS[name])


def evaluate(
    stats: DayStats, geo: GeoInfo, settings: FraudSettings, *, network: bool = False
) -> Verdict:
    """Score one subject-day; see the module docstring."""
    crawlers = {crawler_of(f) for f in stats.bot_families}
    others = [f for f in stats.bot_families if crawler_of(f) is None]
    impostor = ""
    crawler: str | None = None
    if crawlers and None not in crawlers and not others:
        name = sorted(c for c in crawlers if c)[0]
        if settings.verify_crawler_asn and not network and not verify_crawler(name, geo):
            impostor = name
        else:
            crawler = name
    if (
        not stats.bot_families
        and not stats.unconsented_bot_hits
        and stats.unconsented_crawler_hits
        and not stats.hits
    ):
        crawler = "crawler"  # unconsented counters keep no family name
    pure_crawler = (
        crawler is not None and stats.bot_hits == stats.hits and not (stats.unconsented_bot_hits)
    )
    if pure_crawler:
        return Verdict(0, (), crawler)
    signals: list[Signal] = []
    score = 0
    for rule in RULES:
        threshold: Any = getattr(settings, rule.setting)
        if rule.scaled and network and not isinstance(threshold, bool):
            threshold *= settings.network_factor
        value = rule.measure(stats, geo)
        if rule.name == "bot_user_agent" and crawler is not None and not others:
            value = stats.unconsented_bot_hits  # crawler hits are not bot fraud
        if not _fires(value, threshold):
            continue
        explanation = rule.explain.format(value=value, threshold=threshold)
        if rule.name == "bot_user_agent" and impostor:
            explanation += (
                f" It claims to be {impostor} but its network ({geo.as_org or 'unknown'}) "
                "is not the crawler's."
            )
        signals.append(Signal(rule.name, explanation, value, threshold))
        score += rule.weight
    return Verdict(min(score, 100), tuple(signals), crawler)
