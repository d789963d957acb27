"""Tests for reading third-party consent cookies (collector.consent_sources).

Cookies are attacker-controlled, so besides the happy paths every source is fed tampered,
truncated and hostile values; anything that is not a well-formed decision must come back as
``None`` and nothing may raise. Advertising must never be granted by accident (POLICY 4.1.11).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.consent_sources import (
    DEFAULT_CC_CATEGORY_MAP,
    DEFAULT_TCF_MAP,
    MAX_CC_LENGTH,
    MAX_PLAIN_LENGTH,
    MAX_TCF_LENGTH,
    PURPOSES,
    purposes_from_cookieconsent,
    purposes_from_plain,
    purposes_from_tcf,
)

BOTH = frozenset(PURPOSES)
STATS = frozenset({"statistics"})
ADS = frozenset({"advertising"})
NONE: frozenset[str] = frozenset()


def test_defaults_are_the_documented_ones() -> None:
    assert PURPOSES == ("statistics", "advertising")
    assert dict(DEFAULT_CC_CATEGORY_MAP) == {"analytics": "statistics", "marketing": "advertising"}
    assert dict(DEFAULT_TCF_MAP) == {"statistics": (1, 8, 9), "advertising": (1, 2, 3, 4, 7)}


# --- cookieconsent v3 -------------------------------------------------------------------------


def cc_cookie(categories: object, **extra: object) -> str:
    """A cc_cookie value as cookieconsent v3 writes it: encodeURIComponent(JSON.stringify(...))."""
    record: dict[str, object] = {
        "categories": categories,
        "revision": 0,
        "data": None,
        "consentTimestamp": "2024-05-02T10:11:12.000Z",
        "consentId": "5c6d1e0f-1a2b-4c3d-9e8f-0a1b2c3d4e5f",
        "services": {"necessary": [], "analytics": []},
        "languageCode": "en",
        "lastConsentTimestamp": "2024-05-02T10:11:12.000Z",
        "expirationTime": 1730000000000,
    }
    record.update(extra)
    return quote(json.dumps(record, separators=(",", ":")), safe="-_.!~*'()")


@pytest.mark.parametrize(
    ("categories", "expected"),
    [
        (["necessary", "analytics", "marketing"], BOTH),
        (["necessary", "analytics"], STATS),
        (["necessary", "marketing"], ADS),
        (["necessary"], NONE),
        ([], NONE),
        (["necessary", "functionality", "Analytics"], NONE),  # names are case-sensitive
    ],
)
def test_cookieconsent_percent_encoded_record(
    categories: list[str], expected: frozenset[str]
) -> None:
    assert purposes_from_cookieconsent(cc_cookie(categories), DEFAULT_CC_CATEGORY_MAP) == expected


def test_cookieconsent_accepts_unencoded_json() -> None:
    raw = '{"categories":["necessary","analytics"],"revision":0,"data":null}'
    assert purposes_from_cookieconsent(raw, DEFAULT_CC_CATEGORY_MAP) == STATS
    assert purposes_from_cookieconsent(f"  {raw} ", DEFAULT_CC_CATEGORY_MAP) == STATS


def test_cookieconsent_custom_category_map() -> None:
    mapping = {"measurement": "statistics", "stats": "statistics", "ads": "advertising"}
    assert purposes_from_cookieconsent(cc_cookie(["stats"]), mapping) == STATS
    assert purposes_from_cookieconsent(cc_cookie(["measurement", "ads"]), mapping) == BOTH
    # The default names mean nothing under a custom map.
    assert purposes_from_cookieconsent(cc_cookie(["analytics", "marketing"]), mapping) == NONE


def test_cookieconsent_map_targets_outside_our_purposes_are_ignored() -> None:
    mapping = {"analytics": "statistics", "marketing": "newsletters", "x": ""}
    assert purposes_from_cookieconsent(cc_cookie(["analytics", "marketing", "x"]), mapping) == STATS


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(cc_cookie("analytics"), id="categories-is-a-string"),
        pytest.param(cc_cookie({"analytics": True}), id="categories-is-an-object"),
        pytest.param(cc_cookie(None), id="categories-is-null"),
        pytest.param(cc_cookie(["necessary", 1]), id="categories-has-a-number"),
        pytest.param(cc_cookie([["analytics"]]), id="categories-has-a-list"),
        pytest.param(cc_cookie(["analytics", None]), id="categories-has-null"),
        pytest.param(quote('{"revision":0,"data":null}'), id="no-categories"),
        pytest.param(quote('["analytics","marketing"]'), id="top-level-list"),
        pytest.param(quote('"analytics"'), id="top-level-string"),
        pytest.param("null", id="top-level-null"),
        pytest.param(
            quote('{"categories":["analytics","marketing"],"categories":["necessary"]}'),
            id="duplicate-key",
        ),
        pytest.param(quote('{"categories":["analytics"],"revision":NaN}'), id="nan-constant"),
    ],
)
def test_cookieconsent_tampered_record_is_none(value: str) -> None:
    assert purposes_from_cookieconsent(value, DEFAULT_CC_CATEGORY_MAP) is None


def test_cookieconsent_truncated_value_is_none() -> None:
    value = cc_cookie(["necessary", "analytics", "marketing"])
    # Every proper prefix is either broken percent-encoding or incomplete JSON.
    for cut in range(len(value)):
        assert purposes_from_cookieconsent(value[:cut], DEFAULT_CC_CATEGORY_MAP) is None, cut


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("not json at all", id="not-json"),
        pytest.param("%7B%22categories%22%3A%5B%22analytics%22%5D%7D\x00", id="nul-byte"),
        pytest.param('{"categories":["analytics"]}\r\nSet-Cookie: x=1', id="crlf"),
        pytest.param("%7B%22categories%22%3A%5B%22analytics%00%22%5D%7D", id="encoded-nul"),
        pytest.param("%7B%22categories%22%3A%5B%22%FF%22%5D%7D", id="invalid-utf8"),
        pytest.param(quote(quote('{"categories":["analytics"]}')), id="double-encoded"),
        pytest.param('{"categories":["analytics"]}\u200b', id="zero-width-space"),
        pytest.param('{"categories":["analytics\ud800"]}', id="lone-surrogate"),
        pytest.param("[" * 2000 + "]" * 2000, id="deep-nesting"),
        pytest.param('{"categories":' + "[" * 1500 + "]" * 1500 + "}", id="deep-categories"),
    ],
)
def test_cookieconsent_hostile_value_is_none(value: str) -> None:
    assert purposes_from_cookieconsent(value, DEFAULT_CC_CATEGORY_MAP) is None


def test_cookieconsent_length_limit() -> None:
    at_limit = cc_cookie(["analytics"], data="")
    at_limit = cc_cookie(["analytics"], data="x" * (MAX_CC_LENGTH - len(at_limit)))
    assert len(at_limit) == MAX_CC_LENGTH
    assert purposes_from_cookieconsent(at_limit, DEFAULT_CC_CATEGORY_MAP) == STATS
    over = cc_cookie(["analytics"], data="x" * (MAX_CC_LENGTH + 1 - len(cc_cookie(["analytics"]))))
    assert purposes_from_cookieconsent(over, DEFAULT_CC_CATEGORY_MAP) is None
    assert purposes_from_cookieconsent("%20" * 1_000_000, DEFAULT_CC_CATEGORY_MAP) is None


def test_cookieconsent_wrong_python_type_is_none() -> None:
    value = cc_cookie(["analytics"]).encode()
    assert purposes_from_cookieconsent(value, DEFAULT_CC_CATEGORY_MAP) is None  # type: ignore[arg-type]


# --- IAB TCF v2: a small encoder written from the spec's core-segment field table -------------


class BitWriter:
    """Appends big-endian unsigned fields and renders them as a base64url TC string segment."""

    def __init__(self) -> None:
        self._bits: list[str] = []

    def uint(self, value: int, width: int) -> BitWriter:
        assert 0 <= value < 1 << width, (value, width)
        self._bits.append(format(value, f"0{width}b"))
        return self

    def flags(self, ids: Iterable[int], width: int) -> BitWriter:
        """A bit field where id i (1-based) is the i-th bit from the left."""
        chosen = set(ids)
        assert all(1 <= i <= width for i in chosen)
        self._bits.append("".join("1" if i in chosen else "0" for i in range(1, width + 1)))
        return self

    def letters(self, code: str) -> BitWriter:
        for letter in code:
            self.uint(ord(letter) - ord("A"), 6)
        return self

    def ranges(self, entries: Sequence[tuple[int, int]]) -> BitWriter:
        self.uint(len(entries), 12)  # NumEntries
        for start, end in entries:
            self.uint(int(start != end), 1)  # IsARange
            self.uint(start, 16)
            if start != end:
                self.uint(end, 16)
        return self

    def base64url(self) -> str:
        bits = "".join(self._bits)
        bits += "0" * (-len(bits) % 8)  # encoders pad the last byte with zeros
        data = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def tc_core(
    *,
    purposes: Iterable[int] = (),
    version: int = 2,
    policy_version: int = 4,
    vendor_consents: Iterable[int] = (),
    max_vendor_id: int = 0,
    vendor_li_ranges: Sequence[tuple[int, int]] = (),
    restrictions: Sequence[tuple[int, int, Sequence[tuple[int, int]]]] = (),
) -> str:
    """Encode a core segment field by field (TCF v2 "Core String" table)."""
    deciseconds = 17_145_000_000  # 2024-04-30, in deciseconds since the epoch
    w = BitWriter()
    w.uint(version, 6).uint(deciseconds, 36).uint(deciseconds, 36)  # Version, Created, LastUpdated
    w.uint(300, 12).uint(7, 12).uint(1, 6)  # CmpId, CmpVersion, ConsentScreen
    w.letters("EN").uint(250, 12).uint(policy_version, 6)  # ConsentLanguage, VLV, TcfPolicyVersion
    w.uint(1, 1).uint(0, 1).flags((), 12)  # IsServiceSpecific, UseNonStandardTexts, SpecialFeatures
    w.flags(purposes, 24).flags((), 24)  # PurposesConsent, PurposesLITransparency
    w.uint(0, 1).letters("KZ")  # PurposeOneTreatment, PublisherCC
    vendors = set(vendor_consents)
    max_vendor_id = max([max_vendor_id, *vendors])
    w.uint(max_vendor_id, 16).uint(0, 1).flags(vendors, max_vendor_id)  # consents as a bit field
    li_max = max([end for _, end in vendor_li_ranges], default=0)
    w.uint(li_max, 16).uint(1, 1).ranges(vendor_li_ranges)  # legitimate interests as ranges
    w.uint(len(restrictions), 12)  # NumPubRestrictions
    for purpose_id, restriction_type, entries in restrictions:
        w.uint(purpose_id, 6).uint(restriction_type, 2).ranges(entries)
    return w.base64url()


def granted_tcf_ids(value: str) -> set[int] | None:
    """Which of TCF purposes 1-24 the decoder reports consented, probed through the public API."""
    granted: set[int] = set()
    for purpose_id in range(1, 25):
        result = purposes_from_tcf(value, {"statistics": (purpose_id,)})
        if result is None:
            return None
        if result:
            granted.add(purpose_id)
    return granted


def test_tcf_encoder_round_trip() -> None:
    value = tc_core(purposes=[1, 2, 3, 4, 7, 8, 9, 10, 11], vendor_consents=[755, 1000])
    assert value.startswith("C")  # version 2 in the first sextet, as every real v2 string
    assert granted_tcf_ids(value) == {1, 2, 3, 4, 7, 8, 9, 10, 11}


@pytest.mark.parametrize(
    ("purposes", "expected"),
    [
        pytest.param(range(1, 12), BOTH, id="all-eleven"),
        pytest.param([1, 2, 3, 4, 7, 8, 9], BOTH, id="exactly-both-chains"),
        pytest.param([1, 8, 9], STATS, id="statistics-chain"),
        pytest.param([1, 2, 3, 4, 7], ADS, id="advertising-chain"),
        pytest.param([1, 2, 3, 4, 8, 9], STATS, id="ads-missing-measurement-7"),
        pytest.param([2, 3, 4, 7, 8, 9], NONE, id="no-device-access-purpose-1"),
        pytest.param([1, 8], NONE, id="statistics-missing-9"),
        pytest.param([1], NONE, id="only-purpose-1"),
        pytest.param([], NONE, id="rejected-everything"),
        pytest.param(range(12, 25), NONE, id="only-reserved-bits"),
    ],
)
def test_tcf_default_map(purposes: Iterable[int], expected: frozenset[str]) -> None:
    assert purposes_from_tcf(tc_core(purposes=purposes), DEFAULT_TCF_MAP) == expected


def test_tcf_range_sections_and_publisher_restrictions_are_walked() -> None:
    value = tc_core(
        purposes=[1, 8, 9],
        vendor_consents=[1, 2, 3, 700],
        vendor_li_ranges=[(5, 5), (10, 200), (702, 703)],
        restrictions=[(2, 1, [(1, 1), (40, 60)]), (3, 0, [])],
    )
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) == STATS


def test_tcf_other_segments_are_tolerated_but_not_used() -> None:
    core = tc_core(purposes=[1, 8, 9])
    disclosed = BitWriter().uint(1, 3).uint(10, 16).uint(0, 1).flags([3, 10], 10).base64url()
    publisher = BitWriter().uint(3, 3).flags([1, 2, 3, 4, 7], 24).flags((), 24).uint(0, 6)
    for value in (f"{core}.{disclosed}", f"{core}.{disclosed}.{publisher.base64url()}"):
        assert purposes_from_tcf(value, DEFAULT_TCF_MAP) == STATS
    assert purposes_from_tcf(f"{core}.{publisher.base64url()}=", DEFAULT_TCF_MAP) == STATS


# Real TC strings with documented purpose consents.
# - iabtcf-java (IAB Tech Lab), src/test/java/com/iabtcf/decoder/TCStringV2Test.java: strings made
#   with the iabtcf.com encoder, asserted there as getPurposesConsent() == {2, 10} / {3..9}.
# - A public JavaScript `tcfUtils` test (isPurposeConsentSet) listing purposes 1-10 per string.
REAL_WORLD_TC_STRINGS = [
    ("COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA", {2, 10}),
    (
        "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA",
        {3, 4, 5, 6, 7, 8, 9},
    ),
    (
        "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA"
        ".IBAgAAAgAIAwgAgAAAAEAAAACA.QAagAQAgAIAwgA.cAAAAAAAITg=",
        {3, 4, 5, 6, 7, 8, 9},
    ),
    (
        "COwBOpCOwBOpCLqAAAENAPCAAAAAAAAAAAAAFfwAYFfAV-BVkAGBVYFWAAA"
        ".IFoEUQQgAIQwgIwQABAEAAAAOIAACAIAAAAQAIAgEAACEAAAAAgAQBAAAAAAAGBAAgAAAAAAAFAAECAAAgAAQARA"
        "EQAAAAAJAAIAAgAAAYQEAAAQmAgBC3ZAYzUw",
        set(),
    ),
    ("CPh7_cXPh7_cXKMAAAENCZCAAKqAAAAAAAAAAAAAAAAA", {1, 3, 5, 7, 9}),
    ("CPh8CeXPh8CeXMgAAAENCZCAAFVAAAAAAAAAAAAAAAAA", {2, 4, 6, 8, 10}),
    ("CPh8CoIPh8CoINYAAAENCZCAAP_AAAAAAAAAAAAAAAAA", set(range(1, 11))),
    ("CPh8CjOPh8CjOEZAAAENCZCAAAAAAAAAAAAAAAAAAAAA", set()),
]


@pytest.mark.parametrize(("value", "expected_ids"), REAL_WORLD_TC_STRINGS)
def test_tcf_real_world_strings_decode_to_documented_purposes(
    value: str, expected_ids: set[int]
) -> None:
    assert granted_tcf_ids(value) == expected_ids


def test_tcf_real_world_string_with_all_purposes_grants_both() -> None:
    value = "CPh8CoIPh8CoINYAAAENCZCAAP_AAAAAAAAAAAAAAAAA"
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) == BOTH
    # Purposes 1,3,5,7,9 only: statistics lacks 8, advertising lacks 2 and 4.
    assert (
        purposes_from_tcf("CPh7_cXPh7_cXKMAAAENCZCAAKqAAAAAAAAAAAAAAAAA", DEFAULT_TCF_MAP) == NONE
    )


def test_tcf_tampered_purpose_bits_change_the_decision() -> None:
    # There is no signature in a TC string; a structurally valid edit is read as written. Here
    # "P_" (purposes 1-10) becomes "AA" in the PurposesConsent field, i.e. nothing consented.
    original = "CPh8CoIPh8CoINYAAAENCZCAAP_AAAAAAAAAAAAAAAAA"
    tampered = original.replace("AAP_AAA", "AAAAAAA", 1)
    assert granted_tcf_ids(tampered) == set()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(tc_core(purposes=range(1, 12), version=1), id="version-1-encoded"),
        pytest.param(tc_core(purposes=range(1, 12), version=3), id="version-3-encoded"),
        pytest.param(tc_core(purposes=range(1, 12), version=0), id="version-0-encoded"),
        # TCF v1.1 consent strings (start with "B"), from public v1 decoder fixtures.
        pytest.param("BOVeoB_OVeoFxC-AHAFRBtAAAAAhGAEAD4AXAA2YCEQ", id="version-1-real"),
        pytest.param("BPh8CjOPh8CjOEZAAAENCZCAAP_AAAAAAAAAAAAAAAAA", id="v2-with-version-1"),
    ],
)
def test_tcf_wrong_version_is_none(value: str) -> None:
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) is None


def test_tcf_truncated_core_is_none() -> None:
    value = tc_core(
        purposes=range(1, 12),
        vendor_consents=range(1, 300, 7),
        vendor_li_ranges=[(1, 50), (60, 60)],
        restrictions=[(2, 1, [(3, 9)])],
    )
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) == BOTH
    # Dropping at least one whole byte always cuts into a field (only < 8 bits are padding).
    for cut in range(len(value) - 2):
        assert purposes_from_tcf(value[:cut], DEFAULT_TCF_MAP) is None, cut
    # Real strings cut anywhere inside their purpose or vendor fields.
    real = "CPh8CoIPh8CoINYAAAENCZCAAP_AAAAAAAAAAAAAAAAA"
    for cut in (1, 4, 20, 28, 30, 36, 38):
        assert purposes_from_tcf(real[:cut], DEFAULT_TCF_MAP) is None, cut


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(tc_core(vendor_li_ranges=[(0, 5)]), id="vendor-range-starts-at-0"),
        pytest.param(tc_core(vendor_li_ranges=[(9, 3)]), id="vendor-range-backwards"),
        pytest.param(tc_core(restrictions=[(2, 1, [(0, 0)])]), id="restriction-vendor-0"),
        # MaxVendorId claims 65535 vendors in a bit field that is not there.
        pytest.param(
            BitWriter()
            .uint(2, 6)
            .uint(0, 36)
            .uint(0, 36)
            .uint(0, 74)
            .flags(range(1, 12), 24)
            .uint(0, 37)
            .uint(65535, 16)
            .uint(0, 1)
            .base64url(),
            id="vendor-bitfield-overrun",
        ),
    ],
)
def test_tcf_inconsistent_core_is_none(value: str) -> None:
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) is None


ALL_PURPOSES_CORE = "CPh8CoIPh8CoINYAAAENCZCAAP_AAAAAAAAAAAAAAAAA"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="only-dot"),
        pytest.param(f".{ALL_PURPOSES_CORE}", id="empty-core"),
        pytest.param(f"{ALL_PURPOSES_CORE}.", id="empty-trailing-segment"),
        pytest.param(f"{ALL_PURPOSES_CORE}..IBAgAA", id="empty-middle-segment"),
        pytest.param(f"{ALL_PURPOSES_CORE}.IB!gAA", id="bad-char-in-other-segment"),
        pytest.param(ALL_PURPOSES_CORE.replace("_", "/"), id="standard-base64-slash"),
        pytest.param(ALL_PURPOSES_CORE[:-4] + "AA+A", id="standard-base64-plus"),
        pytest.param(ALL_PURPOSES_CORE + "==", id="padding-on-core"),
        pytest.param(ALL_PURPOSES_CORE + "A", id="impossible-base64-length"),
        pytest.param("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!", id="not-base64"),
        pytest.param(ALL_PURPOSES_CORE[:10] + "\x00" + ALL_PURPOSES_CORE[11:], id="nul-byte"),
        pytest.param(ALL_PURPOSES_CORE + "\r\n", id="crlf"),
        pytest.param(ALL_PURPOSES_CORE[:10] + "é" + ALL_PURPOSES_CORE[11:], id="non-ascii"),
        pytest.param(ALL_PURPOSES_CORE[:10] + "\uff23" + ALL_PURPOSES_CORE[11:], id="fullwidth"),
        pytest.param(f"{ALL_PURPOSES_CORE}.{'A' * MAX_TCF_LENGTH}", id="too-long"),
        pytest.param("C" + "A" * 10_000_000, id="huge"),
        pytest.param(json.dumps({"tcString": ALL_PURPOSES_CORE}), id="json-wrapper"),
    ],
)
def test_tcf_hostile_value_is_none(value: str) -> None:
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) is None


def test_tcf_length_limit_is_inclusive() -> None:
    core = tc_core(purposes=[1, 8, 9])
    filler = "A" * (MAX_TCF_LENGTH - len(core) - 1)
    filler = filler[: len(filler) - (len(filler) % 4 == 1)]  # keep a possible base64 length
    value = f"{core}.{filler}"
    assert len(value) <= MAX_TCF_LENGTH
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) == STATS
    assert purposes_from_tcf(value + "AAAA" * 2, DEFAULT_TCF_MAP) is None


@pytest.mark.parametrize(
    "purpose_map",
    [
        pytest.param({"statistics": ()}, id="empty-id-list"),
        pytest.param({"statistics": (0,)}, id="id-0"),
        pytest.param({"statistics": (1, 25)}, id="id-25"),
        pytest.param({"statistics": (-1,)}, id="negative-id"),
        pytest.param({"statistics": (True,)}, id="bool-id"),
        pytest.param({"statistics": "1"}, id="string-instead-of-ids"),
        pytest.param({"newsletters": (1,)}, id="not-our-purpose"),
        pytest.param({}, id="empty-map"),
    ],
)
def test_tcf_unusable_map_entries_grant_nothing(purpose_map: dict[str, Sequence[int]]) -> None:
    value = tc_core(purposes=range(1, 25))
    assert purposes_from_tcf(value, purpose_map) == NONE


def test_tcf_wrong_python_type_is_none() -> None:
    value = ALL_PURPOSES_CORE.encode()
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) is None  # type: ignore[arg-type]


# --- plain cookie -----------------------------------------------------------------------------

PLAIN_MAP = {"statistics": ["all", "statistics"], "advertising": ["all", "advertising"]}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", BOTH),
        ("statistics", STATS),
        ("advertising", ADS),
        (" all ", BOTH),
        ("statistics,advertising", BOTH),
        ("statistics , advertising", BOTH),
        ("necessary,statistics", STATS),
        ("statistics,,", STATS),
        ("none", NONE),
        ("deny", NONE),
        ("ALL", NONE),  # compared exactly
        ("all-ish", NONE),
        ("a l l", NONE),
    ],
)
def test_plain_values(value: str, expected: frozenset[str]) -> None:
    assert purposes_from_plain(value, PLAIN_MAP) == expected


def test_plain_map_from_the_brief() -> None:
    accepted = {"statistics": ["all", "statistics"], "advertising": ["all"]}
    assert purposes_from_plain("statistics", accepted) == STATS
    assert purposes_from_plain("advertising", accepted) == NONE
    assert purposes_from_plain("all", accepted) == BOTH


def test_plain_map_oddities() -> None:
    # A lone string is one accepted value, not a sequence of one-letter values.
    assert purposes_from_plain("yes", {"statistics": "yes"}) == STATS
    assert purposes_from_plain("y", {"statistics": "yes"}) == NONE
    # Keys that are not our purposes, and non-string entries, grant nothing.
    assert purposes_from_plain("yes", {"newsletters": ["yes"]}) == NONE
    assert purposes_from_plain("1", {"statistics": [1]}) == NONE  # type: ignore[list-item]
    assert purposes_from_plain("all", {}) == NONE


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param(",", id="only-separators"),
        pytest.param(" , ,", id="blank-items"),
        pytest.param("all\x00", id="nul-byte"),
        pytest.param("all\r\nSet-Cookie: a=b", id="crlf"),
        pytest.param("all\t", id="tab"),
        pytest.param("\x1fall", id="unit-separator"),
        pytest.param("all\x7f", id="del"),
        pytest.param("all\u200b", id="zero-width-space"),
        pytest.param("\u202eall", id="bidi-override"),
        pytest.param("all\ud800", id="lone-surrogate"),
        pytest.param("all," * 100, id="too-long-list"),
        pytest.param("a" * 10_000_000, id="huge"),
    ],
)
def test_plain_hostile_value_is_none(value: str) -> None:
    assert purposes_from_plain(value, PLAIN_MAP) is None


def test_plain_length_limit_is_inclusive() -> None:
    value = "all," + "x" * (MAX_PLAIN_LENGTH - 4)
    assert len(value) == MAX_PLAIN_LENGTH
    assert purposes_from_plain(value, PLAIN_MAP) == BOTH
    assert purposes_from_plain(value + "x", PLAIN_MAP) is None


def test_plain_wrong_python_type_is_none() -> None:
    assert purposes_from_plain(b"all", PLAIN_MAP) is None  # type: ignore[arg-type]
    assert purposes_from_plain(None, PLAIN_MAP) is None  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------------------------

_b64url_text = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=", max_size=200
)
_tc_like = st.builds(lambda tail: "C" + tail, _b64url_text)
_random_bytes_tc = st.binary(max_size=200).map(
    lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")
)
_values = st.one_of(st.text(max_size=500), _tc_like, _random_bytes_tc)
_str_maps = st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=5)
_id_maps = st.dictionaries(
    st.sampled_from([*PURPOSES, "other"]), st.lists(st.integers(-5, 30), max_size=6), max_size=3
)
_plain_maps = st.dictionaries(
    st.sampled_from([*PURPOSES, "other"]), st.lists(st.text(max_size=8), max_size=4), max_size=3
)


def _ok(result: frozenset[str] | None) -> bool:
    return result is None or (isinstance(result, frozenset) and result <= BOTH)


@given(_values, _str_maps)
def test_cookieconsent_never_raises(value: str, mapping: dict[str, str]) -> None:
    assert _ok(purposes_from_cookieconsent(value, mapping))
    encoded = quote(value, errors="surrogatepass")
    assert _ok(purposes_from_cookieconsent(encoded, DEFAULT_CC_CATEGORY_MAP))
    assert _ok(purposes_from_cookieconsent(value, DEFAULT_CC_CATEGORY_MAP))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda kids: (
            st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_cookieconsent_never_raises_on_any_json(document: object) -> None:
    text = json.dumps({"categories": document})
    assert _ok(purposes_from_cookieconsent(text, DEFAULT_CC_CATEGORY_MAP))
    assert _ok(purposes_from_cookieconsent(quote(text), DEFAULT_CC_CATEGORY_MAP))


@given(_values, _id_maps)
def test_tcf_never_raises(value: str, mapping: dict[str, list[int]]) -> None:
    assert _ok(purposes_from_tcf(value, mapping))
    assert _ok(purposes_from_tcf(value, DEFAULT_TCF_MAP))


@given(_values, _plain_maps)
def test_plain_never_raises(value: str, mapping: dict[str, list[str]]) -> None:
    assert _ok(purposes_from_plain(value, mapping))


@given(
    st.sets(st.integers(1, 24)),
    st.sets(st.integers(1, 400), max_size=20),
    st.lists(st.tuples(st.integers(1, 500), st.integers(0, 50)), max_size=5),
)
def test_tcf_round_trip_matches_the_encoded_bits(
    purposes: set[int], vendors: set[int], spans: list[tuple[int, int]]
) -> None:
    value = tc_core(
        purposes=purposes,
        vendor_consents=vendors,
        vendor_li_ranges=[(start, start + length) for start, length in spans],
    )
    assert granted_tcf_ids(value) == purposes
    expected = frozenset(p for p, ids in DEFAULT_TCF_MAP.items() if set(ids) <= purposes)
    assert purposes_from_tcf(value, DEFAULT_TCF_MAP) == expected
