"""The benchmark's request mix, shared by the wrk script and our own load client.

Realistic for the store: user agents from ../shared/ua/top_user_agents.txt, 70% of
requests with a valid statistics consent from 2,000 visitors who each keep one user agent,
one address and their cookies across hits (9 in 10 returning, with visitor and session
cookies), 30% without (no decision, a signed refusal, a tampered
cookie, or a refusal from a visitor who still carries a visitor id), thousands of pages
with tracking parameters to strip, and many client IPs behind a trusted proxy
(``X-Forwarded-For``), some of them inside the GeoIP test databases' ranges.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from collector.config import load_settings
from collector.consent import ConsentCodec

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
UA_FILE = SHARED / "ua" / "top_user_agents.txt"
GEOIP = SHARED / "geoip"
SECRET = "bench-secret-0123456789abcdef"
CONSENTED_PER_10 = 7

# Addresses inside the MaxMind test databases' networks, so GeoIP answers for some hits.
_GEO_IPS = (
    "81.2.69.142",
    "81.2.69.160",
    "2.125.160.216",
    "89.160.20.112",
    "216.160.83.56",
    "175.16.199.0",
    "67.43.156.0",
    "1.128.0.0",
    "149.101.100.0",
)


@dataclass(frozen=True, slots=True)
class Mix:
    user_agents: list[str]
    consented: list[str]  # Cookie headers
    unconsented: list[str]  # Cookie headers ('' = none)
    queries: list[str]
    ips: list[str]

    def write_lua_data(self, path: Path) -> None:
        lines = [f"U\t{v}" for v in self.user_agents]
        lines += [f"C\t{v}" for v in self.consented]
        lines += [f"N\t{v}" for v in self.unconsented]
        lines += [f"P\t{v}" for v in self.queries]
        lines += [f"I\t{v}" for v in self.ips]
        path.write_text("\n".join(lines) + "\n", encoding="latin-1")

    def visitor(self, k: int) -> tuple[str, str]:
        """The user agent and address of consented visitor ``k``: one browser keeps both
        across its hits (the Lua script pairs them the same way)."""
        return self.user_agents[k % len(self.user_agents)], self.ips[k % len(self.ips)]

    def requests(self, n: int, seed: int = 1) -> list[tuple[bytes, bool]]:
        """``n`` raw HTTP/1.1 requests and whether each carries statistics consent."""
        rnd = random.Random(seed)
        out = []
        for i in range(1, n + 1):
            consented = i % 10 < CONSENTED_PER_10
            ua, ip = rnd.choice(self.user_agents), rnd.choice(self.ips)
            if consented:
                k = rnd.randrange(len(self.consented))
                cookie = self.consented[k]
                ua, ip = self.visitor(k)
            else:
                cookie = rnd.choice(self.unconsented)
            head = (
                f"GET /p.gif?{rnd.choice(self.queries)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"User-Agent: {ua}\r\n"
                f"X-Forwarded-For: {ip}\r\n"
            )
            if cookie:
                head += f"Cookie: {cookie}\r\n"
            out.append(((head + "\r\n").encode("latin-1"), consented))
        return out


def _hex(rnd: random.Random) -> str:
    return f"{rnd.getrandbits(128):032x}"


def build_mix(
    secret: str = SECRET,
    *,
    visitors: int = 2000,
    pages: int = 5000,
    ips: int = 20_000,
    seed: int = 42,
) -> Mix:
    rnd = random.Random(seed)
    codec = ConsentCodec(load_settings(None, environ={"COLLECTOR_CONSENT_SECRET": secret}).consent)
    name = "kdv_consent"
    other = "_ga=GA1.2.{}.{}; cart=3; theme=dark"
    consented = []
    for v in range(visitors):
        value = codec.encode(codec.issue(1 | (2 if v % 3 == 0 else 0)))
        cookie = f"{other.format(rnd.getrandbits(30), rnd.getrandbits(30))}; {name}={value}"
        # A returning visitor carries the ids from an earlier hit. wrk stores no cookies, so a
        # "new" visitor here is new on every hit; 9 in 10 returning keeps that realistic.
        if v % 10 != 0:
            cookie += f"; kdv_vid={_hex(rnd)}; kdv_sid={_hex(rnd)}"
        consented.append(cookie)
    unconsented = []
    for v in range(visitors // 2):
        kind = v % 4
        if kind == 0:
            cookie = other.format(rnd.getrandbits(30), rnd.getrandbits(30))
        elif kind == 1:
            cookie = f"{name}={codec.encode(codec.issue(0))}"
        elif kind == 2:
            cookie = f"{name}={codec.encode(codec.issue(1))[:-4]}AAAA"  # tampered
        else:
            cookie = f"{name}={codec.encode(codec.issue(0))}; kdv_vid={_hex(rnd)}"
        unconsented.append(cookie)
    unconsented.append("")
    queries = []
    sections = ("catalog", "product", "blog", "cart", "search", "account")
    for p in range(pages):
        page = f"https://shop.example.kz/{sections[p % len(sections)]}/item-{p}"
        if p % 4 == 0:
            page += f"?utm_source=news&utm_campaign=c{p % 50}&sessionid={_hex(rnd)}"
        elif p % 4 == 1:
            page += f"?q=oak+table&page={p % 9}"
        q = f"u={quote(page, safe='')}"
        if p % 3 == 0:
            q += f"&r={quote('https://www.google.com/search?q=shop', safe='')}"
        if p % 10 == 0:
            q += f"&e=banner-{p % 20}"
        queries.append(q)
    addresses = list(_GEO_IPS)
    while len(addresses) < ips:
        a = rnd.randrange(1, 224)
        if a in (10, 127):
            continue
        addresses.append(f"{a}.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}")
    user_agents = [ua for ua in UA_FILE.read_text().splitlines() if ua.strip()]
    return Mix(user_agents, consented, unconsented, queries, addresses)


def collector_env(db: Path, secret: str = SECRET) -> dict[str, str]:
    """Environment for a benchmark collector: consent on, SQLite, UA and GeoIP on."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "COLLECTOR_STORAGE_PATH": str(db),
        "COLLECTOR_CONSENT_SECRET": secret,
        "COLLECTOR_SERVER_TRUSTED_PROXIES": "127.0.0.1/32",
        "COLLECTOR_SERVER_LOG_LEVEL": "warning",
        "COLLECTOR_GEOIP_CITY_DB": str(GEOIP / "GeoIP2-City-Test.mmdb"),
        "COLLECTOR_GEOIP_ASN_DB": str(GEOIP / "GeoLite2-ASN-Test.mmdb"),
        "COLLECTOR_GEOIP_ANONYMOUS_DB": str(GEOIP / "GeoIP2-Anonymous-IP-Test.mmdb"),
    }
