"""What a block (6.2.4) names and how long it lasts: parsing and validation, no I/O.

A visitor id, a canonical IP, or a CIDR network (host bits cleared, IPv4-mapped IPv6
folded to IPv4 as hits store IPs, a full-length prefix being one IP); networks wider than
``MIN_PREFIX`` need force. An end is an ISO date-time, unix ms, or a duration (``30d``).
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Literal

from collector.errors import InputError, Unprocessable
from collector.incident import parse_time
from collector.subjects import Subject

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Kind = Literal["visitor", "ip", "network"]
# Wider networks need force: an IPv4 /16 (65,536 addresses) or an IPv6 /32 (a whole
# provider's allocation) is already far more than one subject of a check.
MIN_PREFIX = {4: 16, 6: 32}
_DURATION = re.compile(r"^\s*([1-9][0-9]{0,5})\s*([smhdw])\s*$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True, slots=True)
class Target:
    """What a block names: a visitor id, a canonical IP, or a normalised network."""

    kind: Kind
    value: str

    @classmethod
    def parse(
        cls,
        visitor: str | None = None,
        ip: str | None = None,
        network: str | None = None,
        *,
        force: bool = False,
    ) -> Target:
        """Exactly one of the three, validated and normalised; InputError naming it."""
        if sum(bool(x) for x in (visitor, ip, network)) != 1:
            raise InputError("name exactly one subject: a visitor id, an IP address or a network")
        if network:
            net = parse_network(network, force=force)
            if net.prefixlen == net.max_prefixlen:  # a /32 or /128 is one address
                return cls("ip", str(net.network_address))
            return cls("network", str(net))
        subject = Subject.parse(visitor, ip)
        return cls(subject.kind, subject.value)

    @property
    def network(self) -> Network | None:
        return ipaddress.ip_network(self.value) if self.kind == "network" else None

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "value": self.value}


def parse_network(text: str, *, force: bool = False) -> Network:
    """A CIDR network, host bits cleared, IPv4-mapped IPv6 folded to IPv4 (as hits store
    IPs); wider than ``MIN_PREFIX`` only with ``force`` (Unprocessable otherwise)."""
    try:
        net: Network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InputError(f"network: not an IP network (CIDR): {text[:60]!r}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    limit = MIN_PREFIX[net.version]
    if net.prefixlen < limit and not force:
        raise Unprocessable(
            f"network: {net} spans {net.num_addresses:,} addresses, wider than a "
            f"/{limit} (IPv{net.version}); name a narrower network, or force it"
        )
    return net


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` as milliseconds."""
    found = _DURATION.match(text)
    if not found:
        raise InputError(f"for: expected a duration like 30d, 12h, 90m, 2w: {text[:40]!r}")
    return int(found.group(1)) * _UNIT_MS[found.group(2)]


def parse_expiry(
    expires_at: str | int | None, duration: str | None, now_ms: int | None = None
) -> int | None:
    """The end of a block in unix ms: an ISO date-time (or unix ms), or now + a duration;
    None for a block until released. Unprocessable when it is not in the future."""
    if expires_at is not None and duration is not None:
        raise InputError("expires_at, for: give one of them, not both")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if duration is not None:
        return now + parse_duration(duration)
    if expires_at is None:
        return None
    if isinstance(expires_at, bool):
        raise InputError("expires_at: expected an ISO date-time or unix milliseconds")
    if isinstance(expires_at, int):
        when = expires_at
    else:
        when = parse_time(expires_at, "expires_at")
    if when <= now:
        raise Unprocessable("expires_at: must be in the future")
    return when
