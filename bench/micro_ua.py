"""Micro-benchmark: user-agent parsing and GeoIP lookups, legacy path against ours.

``user_agents.parse`` runs ua-parser's legacy pure-Python regexes (~0.5 ms per new
string); collector.enrich resolves with ua-parser-rs and caches the result (LRU), and
collector.geo reads maxminddb directly behind a dict cache instead of building geoip2
model objects. Timings are per call, the median of several repetitions.

    python -m bench.micro_ua
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.mix import GEOIP, SHARED, UA_FILE, build_mix


def _unique_agents(limit: int) -> list[str]:
    """Distinct real user agents: the top list plus ua-parser's test corpus."""
    agents = [ua for ua in UA_FILE.read_text().splitlines() if ua.strip()]
    text = (SHARED / "ua" / "test_ua.yaml").read_text()
    agents += re.findall(r"user_agent_string: '(.*)'", text)
    return list(dict.fromkeys(agents))[:limit]


def per_call_us(func: Callable[[Any], Any], inputs: Sequence[Any], repeat: int = 3) -> float:
    """Median over ``repeat`` passes of the mean time per call, in microseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        for value in inputs:
            func(value)
        times.append((time.perf_counter() - started) / len(inputs) * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", type=int, default=400, help="distinct user agents")
    args = ap.parse_args(argv)

    import geoip2.database
    import maxminddb
    import user_agents
    from ua_parser import Parser, load_builtins, regex

    from collector.config import GeoipSettings
    from collector.enrich import make_ua_parser
    from collector.geo import GeoIP

    agents = _unique_agents(args.agents)
    results: dict[str, float] = {}
    # New strings each call: a fresh parser per pass defeats every cache.
    legacy = per_call_us(user_agents.parse, agents, repeat=1)
    results["user_agents.parse, new string (legacy regex)"] = legacy
    rs = Parser(regex.Resolver(load_builtins()))
    results["ua_parser + ua-parser-rs, new string"] = per_call_us(rs.parse, agents)
    cold: list[float] = []
    for _ in range(3):
        cold.append(per_call_us(make_ua_parser(), agents, repeat=1))
    results["enrich.make_ua_parser, new string"] = statistics.median(cold)
    # Traffic repeats: the benchmark mix draws from the top-UA list.
    parse = make_ua_parser()
    traffic = [random.Random(1).choice(agents[:196]) for _ in range(50_000)]
    for ua in traffic:
        parse(ua)
    results["enrich.make_ua_parser, repeated traffic (LRU hit)"] = per_call_us(parse, traffic)

    ips = build_mix(ips=5000).ips
    city = str(GEOIP / "GeoIP2-City-Test.mmdb")
    with geoip2.database.Reader(city) as reader:

        def geoip2_city(ip: str) -> Any:
            try:
                return reader.city(ip)
            except geoip2.errors.AddressNotFoundError:
                return None

        results["geoip2 Reader.city (model objects)"] = per_call_us(geoip2_city, ips)
    with maxminddb.open_database(city, maxminddb.MODE_MMAP) as mm:
        results["maxminddb get (City)"] = per_call_us(mm.get, ips)
    geo = GeoIP(
        GeoipSettings(
            city_db=city,
            asn_db=str(GEOIP / "GeoLite2-ASN-Test.mmdb"),
            anonymous_db=str(GEOIP / "GeoIP2-Anonymous-IP-Test.mmdb"),
        )
    )
    geo.open()
    results["geo.GeoIP.lookup, 3 databases, new IP"] = per_call_us(geo._lookup, ips)
    for ip in ips:
        geo.lookup(ip)
    results["geo.GeoIP.lookup, repeated IP (cache hit)"] = per_call_us(geo.lookup, ips)
    geo.close()

    width = max(map(len, results))
    print(f"\n{'user agent / GeoIP, per call':{width}}  microseconds")
    for name, us in results.items():
        print(f"{name:{width}}  {us:10.2f}")
    return results


if __name__ == "__main__":
    main()
