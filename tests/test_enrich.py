"""Enrichment: URL sanitising, user-agent parsing against uap-core's fixtures, GeoIP."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import yaml
from user_agents import parse as reference_parse

from collector.config import GeoipSettings, PrivacySettings
from collector.enrich import UrlSanitizer, make_ua_parser, normalize_ip
from collector.geo import GeoIP
from tests.conftest import GEOIP, UA_DIR

clean = UrlSanitizer(PrivacySettings()).clean


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("https://Shop.Example/a/b?x=1#frag", "https://shop.example/a/b"),
        (
            "https://s.kz/p?utm_source=ya&utm_medium=cpc&q=x",
            "https://s.kz/p?utm_source=ya&utm_medium=cpc",
        ),
        ("https://user:pass@s.kz:8443/p", "https://s.kz:8443/p"),
        ("https://s.kz/account/ivan.petrov@mail.kz/orders", "https://s.kz/account/[email]/orders"),
        ("https://s.kz/p?utm_content=ivan%40mail.kz", "https://s.kz/p?utm_content=%5Bemail%5D"),
        (
            "https://s.kz/reset/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",
            "https://s.kz/reset/[token]",
        ),
        ("https://s.kz/login?token=abc", "https://s.kz/login"),
        ("https://s.kz/t/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "https://s.kz/t/[token]"),
        (
            "https://s.kz/catalog/oak-dining-table-2000-extendable",
            "https://s.kz/catalog/oak-dining-table-2000-extendable",
        ),
        ("https://s.kz/ru/каталог", "https://s.kz/ru/%D0%BA%D0%B0%D1%82%D0%B0%D0%BB%D0%BE%D0%B3"),
        ("javascript:alert(1)", None),
        ("data:text/html,<b>x</b>", None),
        ("not a url", None),
        ("https://[::1", None),
        ("", None),
    ],
)
def test_urls_keep_no_fragment_credential_or_secret(raw: str, expected: str | None) -> None:
    assert clean(raw) == expected


def test_urls_are_length_capped() -> None:
    cleaned = clean("https://s.kz/" + "oak-table/" * 1000)
    assert cleaned is not None and len(cleaned) == 2048


def test_ip_normalisation() -> None:
    assert normalize_ip("::ffff:81.2.69.142") == "81.2.69.142"
    assert normalize_ip(" 2001:DB8::1 ") == "2001:db8::1"
    assert normalize_ip("999.1.1.1") is None


def _cases(name: str) -> list[dict[str, str | None]]:
    with open(UA_DIR / name, encoding="utf-8") as fh:
        cases: list[dict[str, str | None]] = yaml.load(fh, Loader=yaml.CSafeLoader)["test_cases"]
    return cases


def test_browser_and_os_match_uap_core_fixtures() -> None:
    parse = make_ua_parser()
    browsers = random.Random(7).sample(_cases("test_ua.yaml"), 300)
    for case in browsers:
        got = parse(str(case["user_agent_string"]))
        assert got.family == case["family"], case
        version = ".".join(str(case[k]) for k in ("major", "minor", "patch") if case[k])
        assert got.version == version, case
    for case in random.Random(7).sample(_cases("test_os.yaml"), 200):
        got = parse(str(case["user_agent_string"]))
        assert got.os_family == case["family"], case


def test_device_class_matches_the_user_agents_package() -> None:
    parse = make_ua_parser()
    uas = (UA_DIR / "top_user_agents.txt").read_text(encoding="utf-8").splitlines()
    for ua in uas:
        ref = reference_parse(ua)
        expected = (
            "bot"
            if ref.is_bot
            else "tablet"
            if ref.is_tablet
            else "mobile"
            if ref.is_mobile
            else "pc"
            if ref.is_pc
            else "other"
        )
        got = parse(ua)
        if got.device_class == "bot" and expected != "bot":
            assert got.family in (
                "curl",
                "Wget",
                "Python Requests",
                "Go-http-client",
                "HeadlessChrome",
            ) or got.family.lower().endswith("bot"), ua
            continue
        assert got.device_class == expected, ua
        assert (got.device_family, got.device_brand or None) == (
            ref.device.family,
            ref.device.brand,
        ), ua


def test_scripted_clients_count_as_bots() -> None:
    parse = make_ua_parser()
    for ua in ("curl/8.5.0", "python-requests/2.31", "Go-http-client/1.1", "Wget/1.21"):
        assert parse(ua).is_bot, ua
    assert parse("").device_class == "other"


def test_geoip_lookups_from_the_test_databases() -> None:
    geo = GeoIP(
        GeoipSettings(
            city_db=str(GEOIP / "GeoIP2-City-Test.mmdb"),
            asn_db=str(GEOIP / "GeoLite2-ASN-Test.mmdb"),
            anonymous_db=str(GEOIP / "GeoIP2-Anonymous-IP-Test.mmdb"),
        )
    )
    geo.open()
    london = geo.lookup("81.2.69.142")
    assert (london.country, london.region, london.city) == ("GB", "ENG", "London")
    assert geo.lookup("1.128.0.0").asn == 1221
    tor = geo.lookup("1.124.213.1")
    assert tor.is_anonymous and tor.is_tor_exit_node
    assert geo.lookup("127.0.0.1").country is None
    geo.close()


def test_missing_or_corrupt_geoip_database_turns_geo_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"not a database")
    geo = GeoIP(GeoipSettings(city_db=str(bad), asn_db=str(tmp_path / "missing.mmdb")))
    geo.open()
    assert not geo.enabled
    assert geo.lookup("81.2.69.142").country is None
    assert sum("cannot be opened" in r.message for r in caplog.records) == 2


def test_replaced_geoip_file_is_reopened(tmp_path: Path) -> None:
    db = tmp_path / "city.mmdb"
    db.write_bytes(b"garbage")
    geo = GeoIP(GeoipSettings(city_db=str(db)))
    geo.open()
    assert geo.lookup("81.2.69.142").country is None
    # geoipupdate writes a new file and renames it over the old one
    tmp = tmp_path / "city.mmdb.tmp"
    shutil.copy(GEOIP / "GeoIP2-City-Test.mmdb", tmp)
    tmp.replace(db)
    geo.maybe_reload()
    assert geo.lookup("81.2.69.142").country == "GB"
    geo.close()
