"""GeoIP lookups (4.1.4: location for fraud prevention and security).

Each MaxMind database (City or Country, ASN, Anonymous IP) is optional and configured on
its own. A missing or corrupt file logs one clear line and turns that lookup off; a file
replaced on disk (as ``geoipupdate`` does) is reopened on the next ``maybe_reload``.
Lookups go through ``maxminddb``'s C reader (``MODE_AUTO``: 0.2 µs against 5 µs for the
pure-Python mmap reader) directly (the geoip2 model objects cost more than the
three fields we keep) behind a bounded cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import maxminddb

from collector.config import GeoipSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GeoInfo:
    country: str | None = None
    region: str | None = None
    city: str | None = None
    asn: int | None = None
    as_org: str | None = None
    is_anonymous: bool = False
    is_anonymous_vpn: bool = False
    is_hosting_provider: bool = False
    is_public_proxy: bool = False
    is_residential_proxy: bool = False
    is_tor_exit_node: bool = False


NO_GEO = GeoInfo()


class _Database:
    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        self.path = path
        self.reader: Any = None
        self._stamp: tuple[int, int] | None = None
        self.open()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def open(self) -> None:
        stamp = self._file_stamp()
        try:
            reader = maxminddb.open_database(self.path, maxminddb.MODE_AUTO)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            logger.error(
                "geoip %s database %s cannot be opened (%s): %s lookups are off",
                self.kind,
                self.path,
                exc,
                self.kind,
            )
            self.close()
        else:
            self.close()
            self.reader = reader
            logger.info("geoip %s database opened: %s", self.kind, self.path)
        self._stamp = stamp

    def changed(self) -> bool:
        return self._file_stamp() != self._stamp

    def get(self, ip: str) -> Any:
        if self.reader is None:
            return None
        try:
            return self.reader.get(ip)
        except (ValueError, maxminddb.InvalidDatabaseError):
            return None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class GeoIP:
    """The configured databases behind one cached ``lookup``."""

    def __init__(self, settings: GeoipSettings) -> None:
        self.settings = settings
        self._dbs: list[_Database] = []
        self._by_kind: dict[str, _Database] = {}
        self._cache: dict[str, GeoInfo] = {}
        self._cache_size = settings.cache_size

    def open(self) -> None:
        """Open each configured database; one that fails is logged and left off."""
        self.close()
        self._dbs = [
            _Database(kind, path)
            for kind, path in (
                ("city", self.settings.city_db),
                ("asn", self.settings.asn_db),
                ("anonymous", self.settings.anonymous_db),
            )
            if path
        ]
        self._by_kind = {db.kind: db for db in self._dbs}
        self._cache.clear()

    @property
    def enabled(self) -> bool:
        return any(db.reader is not None for db in self._dbs)

    def maybe_reload(self) -> None:
        """Reopen any database whose file was replaced; cheap enough to call every few s."""
        for db in self._dbs:
            if db.changed():
                db.open()
                self._cache.clear()

    def lookup(self, ip: str) -> GeoInfo:
        info = self._cache.get(ip)
        if info is None:
            info = self._lookup(ip) if self._dbs else NO_GEO
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[ip] = info
        return info

    def _lookup(self, ip: str) -> GeoInfo:
        fields: dict[str, Any] = {}
        city = self._by_kind.get("city")
        rec = city.get(ip) if city else None
        if rec:
            fields["country"] = (rec.get("country") or {}).get("iso_code")
            subdivisions = rec.get("subdivisions") or []
            if subdivisions:
                fields["region"] = subdivisions[0].get("iso_code")
            fields["city"] = ((rec.get("city") or {}).get("names") or {}).get("en")
        asn = self._by_kind.get("asn")
        rec = asn.get(ip) if asn else None
        if rec:
            fields["asn"] = rec.get("autonomous_system_number")
            fields["as_org"] = rec.get("autonomous_system_organization")
        anon = self._by_kind.get("anonymous")
        rec = anon.get(ip) if anon else None
        if rec:
            for flag in (
                "is_anonymous",
                "is_anonymous_vpn",
                "is_hosting_provider",
                "is_public_proxy",
                "is_residential_proxy",
                "is_tor_exit_node",
            ):
                fields[flag] = bool(rec.get(flag, False))
        return GeoInfo(**fields) if fields else NO_GEO

    def close(self) -> None:
        for db in self._dbs:
            db.close()
        self._dbs = []
        self._by_kind = {}
        self._cache.clear()
