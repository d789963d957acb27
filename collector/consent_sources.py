"""Read a visitor's consent decision from a third-party consent platform's cookie.

Many shops already run a consent banner (cookieconsent, an IAB TCF CMP, or a home-grown one that
writes a plain cookie). Asking the visitor a second time would be hostile, so the collector can take
the decision those banners already recorded and translate it into our own purposes, "statistics" and
"advertising".

These cookies arrive from the browser and are therefore attacker-controlled. Every parser here is
pure, bounded in time and memory, and fails closed: a value it cannot fully validate yields ``None``
("no usable decision"), which the caller must treat exactly like "no consent". Advertising is only
ever granted on a positive, well-formed signal (POLICY 4.1.11 — advertising only with the user's
consent; 4.1.10 likewise for offers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NoReturn
from urllib.parse import unquote

__all__ = [
    "DEFAULT_CC_CATEGORY_MAP",
    "DEFAULT_TCF_MAP",
    "MAX_CC_LENGTH",
    "MAX_PLAIN_LENGTH",
    "MAX_TCF_LENGTH",
    "PURPOSES",
    "purposes_from_cookieconsent",
    "purposes_from_plain",
    "purposes_from_tcf",
]

PURPOSES = ("statistics", "advertising")

# Upper bounds on the raw cookie value; anything longer is refused before any parsing work.
MAX_CC_LENGTH = 4096
MAX_TCF_LENGTH = 8192
MAX_PLAIN_LENGTH = 256

DEFAULT_CC_CATEGORY_MAP: Mapping[str, str] = MappingProxyType(
    {"analytics": "statistics", "marketing": "advertising"}
)

# TCF v2.2 purpose ids (Global Vendor List, purposes 1-11):
#   1 store and/or access information on a device   7 measure advertising performance
#   2 use limited data to select advertising         8 measure content performance
#   3 create profiles for personalised advertising   9 understand audiences (statistics)
#   4 use profiles to select personalised advertising
DEFAULT_TCF_MAP: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {"statistics": (1, 8, 9), "advertising": (1, 2, 3, 4, 7)}
)


# --- cookieconsent v3 -------------------------------------------------------------------------


def purposes_from_cookieconsent(
    value: str, category_map: Mapping[str, str]
) -> frozenset[str] | None:
    """Our purposes granted by a cookieconsent v3 (orestbida) ``cc_cookie`` value.

    The value is JSON, usually percent-encoded, whose ``"categories"`` list names the accepted
    categories. Each accepted category that ``category_map`` maps to one of ``PURPOSES`` grants
    that purpose (several categories may map to the same purpose; any one of them grants it).
    Returns ``None`` when the value is not a well-formed cookieconsent record.
    """
    if not _is_clean_text(value, MAX_CC_LENGTH):
        return None
    text = value.strip(" ")
    if not text.startswith("{"):
        # cookieconsent v3 stores encodeURIComponent(JSON); decode exactly once, so a
        # double-encoded value fails to parse instead of being guessed at.
        try:
            text = unquote(text, errors="strict")
        except UnicodeDecodeError:
            return None
    try:
        record = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    categories = record.get("categories")
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        return None
    granted = {category_map.get(category) for category in categories}
    return frozenset(purpose for purpose in PURPOSES if purpose in granted)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"categories": [...], "categories": [...]} is ambiguous between parsers; refuse it.
    record = dict(pairs)
    if len(record) != len(pairs):
        raise ValueError("duplicate key")
    return record


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-standard JSON constant {name}")


# --- IAB TCF v2.2 -----------------------------------------------------------------------------

_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SEXTET_BITS = {char: format(index, "06b") for index, char in enumerate(_B64URL_ALPHABET)}
_TCF_VERSION = 2
_PURPOSE_BITS = 24


class _Malformed(Exception):
    """Internal: the TC string does not follow the specification."""


class _BitReader:
    """Reads big-endian unsigned fields from one base64url (unpadded) TC string segment."""

    __slots__ = ("_bits", "_pos")

    def __init__(self, segment: str) -> None:
        # A base64 text of 4k+1 characters cannot come from whole bytes.
        if not segment or len(segment) % 4 == 1:
            raise _Malformed("impossible base64 length")
        try:
            self._bits = "".join([_SEXTET_BITS[char] for char in segment])
        except KeyError:
            raise _Malformed("not base64url") from None
        self._pos = 0

    def read(self, width: int) -> int:
        end = self._advance(width)
        return int(self._bits[end - width : end], 2)

    def skip(self, width: int) -> None:
        self._advance(width)

    def _advance(self, width: int) -> int:
        end = self._pos + width
        if end > len(self._bits):
            raise _Malformed("truncated")
        self._pos = end
        return end


def purposes_from_tcf(
    value: str, purpose_map: Mapping[str, Sequence[int]]
) -> frozenset[str] | None:
    """Our purposes granted by an IAB TCF v2.x ``euconsent-v2`` TC string.

    Only the core segment (before the first ``.``) is decoded; it is walked field by field to its
    end (vendor consents, vendor legitimate interests, publisher restrictions), so a truncated or
    garbled string is refused rather than half-read. The remaining segments are only checked to be
    base64url. The TcfPolicyVersion is not checked: strings written under policy 2 (TCF 2.0/2.1)
    and 4 (TCF 2.2) share this layout.

    A purpose of ours is granted when *every* TCF purpose id that ``purpose_map`` lists for it has
    its PurposesConsent bit set. A purpose with no ids, or with an id outside 1-24, is never
    granted (fail closed). We read the visitor's purpose-level consents, not vendor consents: the
    collector is the publisher's own first-party tool, not a Global Vendor List vendor.

    ``DEFAULT_TCF_MAP`` chooses:

    - statistics -> (1, 8, 9): store/access information on a device, measure content
      performance, understand audiences through statistics;
    - advertising -> (1, 2, 3, 4, 7): store/access information, use limited data to select
      advertising, create and use profiles for personalised advertising, measure advertising
      performance. Requiring all five keeps advertising off unless the visitor accepted the whole
      advertising chain (POLICY 4.1.11).

    Returns ``None`` for a value that is not a valid v2 TC string (wrong version, not base64url,
    truncated, longer than ``MAX_TCF_LENGTH``, non-ASCII, ...).
    """
    if not isinstance(value, str) or len(value) > MAX_TCF_LENGTH or not value.isascii():
        return None
    segments = value.strip(" ").split(".")
    try:
        for segment in segments[1:]:
            # Other segments are not used, but some encoders pad them with "=": tolerate that.
            _BitReader(segment.rstrip("="))
        consents = _core_purpose_consents(_BitReader(segments[0]))
    except _Malformed:
        return None
    granted: list[str] = []
    for purpose in PURPOSES:
        ids = purpose_map.get(purpose)
        if ids is not None and _all_consented(ids, consents):
            granted.append(purpose)
    return frozenset(granted)


def _all_consented(ids: Sequence[int], consents: int) -> bool:
    if isinstance(ids, (str, bytes)) or len(ids) == 0:
        return False
    for purpose_id in ids:
        valid = type(purpose_id) is int and 1 <= purpose_id <= _PURPOSE_BITS
        # Purpose i is bit i counted from the most significant bit of the 24-bit field.
        if not valid or not (consents >> (_PURPOSE_BITS - purpose_id)) & 1:
            return False
    return True


def _core_purpose_consents(bits: _BitReader) -> int:
    """Validate a core segment and return its 24-bit PurposesConsent field."""
    if bits.read(6) != _TCF_VERSION:
        raise _Malformed("not a TCF v2 core segment")
    # Created(36) LastUpdated(36) CmpId(12) CmpVersion(12) ConsentScreen(6) ConsentLanguage(12)
    # VendorListVersion(12) TcfPolicyVersion(6) IsServiceSpecific(1) UseNonStandardTexts(1)
    # SpecialFeatureOptIns(12)
    bits.skip(36 + 36 + 12 + 12 + 6 + 12 + 12 + 6 + 1 + 1 + 12)
    purposes_consent = bits.read(_PURPOSE_BITS)
    # PurposesLITransparency(24) PurposeOneTreatment(1) PublisherCC(12)
    bits.skip(24 + 1 + 12)
    _skip_vendor_section(bits)  # vendor consents
    _skip_vendor_section(bits)  # vendor legitimate interests
    for _ in range(bits.read(12)):  # NumPubRestrictions
        bits.skip(6 + 2)  # PurposeId, RestrictionType
        _skip_range_entries(bits)
    return purposes_consent


def _skip_vendor_section(bits: _BitReader) -> None:
    max_vendor_id = bits.read(16)
    if bits.read(1):  # IsRangeEncoding
        _skip_range_entries(bits)
    else:
        bits.skip(max_vendor_id)


def _skip_range_entries(bits: _BitReader) -> None:
    for _ in range(bits.read(12)):  # NumEntries
        is_range = bits.read(1)
        start = bits.read(16)
        end = bits.read(16) if is_range else start
        if start == 0 or end < start:
            raise _Malformed("bad vendor range")


# --- plain cookie -----------------------------------------------------------------------------


def purposes_from_plain(value: str, accepted: Mapping[str, Sequence[str]]) -> frozenset[str] | None:
    """Our purposes granted by a plain decision cookie such as ``cookie_consent=all``.

    The value may be a comma-separated list; each item is stripped and compared exactly
    (case-sensitively) with the values ``accepted`` lists for each of ``PURPOSES``. A
    well-formed but unknown value is a refusal (empty set); an empty value, one longer than
    ``MAX_PLAIN_LENGTH`` or one containing control/invisible characters gives ``None``.
    """
    if not _is_clean_text(value, MAX_PLAIN_LENGTH):
        return None
    items = {item.strip() for item in value.split(",")} - {""}
    if not items:
        return None
    granted: list[str] = []
    for purpose in PURPOSES:
        grants = accepted.get(purpose, ())
        if isinstance(grants, str):  # a lone string is one value, not a sequence of characters
            grants = (grants,)
        if any(isinstance(grant, str) and grant in items for grant in grants):
            granted.append(purpose)
    return frozenset(granted)


def _is_clean_text(value: object, max_length: int) -> bool:
    # isprintable() is False for control characters (NUL, CR, LF, tab), lone surrogates and
    # invisible format characters, none of which a legitimate cookie value contains.
    return isinstance(value, str) and 0 < len(value) <= max_length and value.isprintable()
