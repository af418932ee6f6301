"""Keyed pseudonyms for the values a purge leaves at the source.

HMAC-SHA256 under the destination region's key, over the value's text with a tag for its
kind: the same value under the same key always gives the same pseudonym (so joins across
tables on a pseudonymised column still work), another region's key gives another, and no
one without the key can recompute or reverse it (the EDPB's 2025 guidelines accept keyed
MACs as pseudonymisation). NULL stays NULL. Each result is valid for its column's type:

* text and character varying(n): ``pz1_`` and hex digits of the MAC, cut to fit (n >= 12);
* inet: an address from a range reserved for documentation or future use, so a
  pseudonym can never be someone's real address: IPv4 values map into 240.0.0.0/4 (28
  bits of the MAC), IPv6 values into 2001:db8::/32 (96 bits).

Other types are refused before anything is touched (`unsupported`).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any

TAG = "pz1_"
TEXT_BITS = 128  # 32 hex digits where the column has room
_VARCHAR = re.compile(r"^character varying(?:\((\d+)\))?$")
MIN_VARCHAR = len(TAG) + 8


def kind(type_name: str) -> str | None:
    """'text', 'inet' or None (not supported) for a column's type as format_type prints it."""
    if type_name == "text":
        return "text"
    m = _VARCHAR.match(type_name)
    if m:
        return "text" if m.group(1) is None or int(m.group(1)) >= MIN_VARCHAR else None
    if type_name == "inet":
        return "inet"
    return None


def unsupported(type_name: str) -> str | None:
    """Why a column of this type cannot be pseudonymised, or None when it can."""
    if kind(type_name) is not None:
        return None
    if _VARCHAR.match(type_name):
        return f"{type_name} is too short for a pseudonym (at least {MIN_VARCHAR} characters)"
    return f"type {type_name} cannot be pseudonymised (text, character varying or inet can)"


def _mac(key: bytes, tag: str, value: str) -> bytes:
    return hmac.digest(key, f"{tag}:{value}".encode(), "sha256")


def _limit(type_name: str) -> int | None:
    m = _VARCHAR.match(type_name)
    return int(m.group(1)) if m and m.group(1) else None


_V4 = re.compile(r"^((?:\d{1,3}\.){3}\d{1,3})(?:/\d+)?$")  # PostgreSQL's own text: no leading zeros
_V4_RANGE, _V4_BITS = 240 << 24, (1 << 28) - 1
_V6_RANGE, _V6_BITS = 0x20010DB8 << 96, (1 << 96) - 1


def _inet(key: bytes, value: Any) -> str:
    text = str(value)
    m = _V4.match(text)
    if m:  # the common case, without parsing
        mac = int.from_bytes(_mac(key, "inet", m.group(1)), "big")
        return ".".join(str(b) for b in (_V4_RANGE | (mac & _V4_BITS)).to_bytes(4, "big"))
    head = text.partition("/")[0]  # PostgreSQL's text: address/prefix length
    try:  # parsed and printed in C: a seventh of the time ipaddress takes
        packed = socket.inet_pton(socket.AF_INET6, head)
    except OSError:
        addr = ipaddress.ip_address(head)
        mac = int.from_bytes(_mac(key, "inet", str(addr)), "big")
        if addr.version == 4:
            return str(ipaddress.IPv4Address(_V4_RANGE | (mac & _V4_BITS)))
        packed = addr.packed
    else:
        # inet_ntop compresses zeros as ipaddress does (RFC 5952) but prints the IPv4-mapped
        # and -compatible forms dotted: those take ipaddress's text, as every pseudonym did
        canon = socket.inet_ntop(socket.AF_INET6, packed)
        mac = int.from_bytes(_mac(key, "inet", str(ipaddress.IPv6Address(packed)) if "." in canon else canon), "big")
    # 2001:db8::/32 prints the same either way (never a dotted form)
    return socket.inet_ntop(socket.AF_INET6, (_V6_RANGE | (mac & _V6_BITS)).to_bytes(16, "big"))


def pseudonymiser(key: bytes, type_name: str) -> Callable[[Any], Any]:
    """The pseudonym function for one column of `type_name` (None stays None)."""
    k = kind(type_name)
    if k == "text":
        limit = _limit(type_name) or len(TAG) + TEXT_BITS // 4

        def text(value: Any) -> Any:
            if value is None:
                return None
            return (TAG + _mac(key, "text", str(value)).hex()[: TEXT_BITS // 4])[:limit]

        return text
    if k == "inet":
        return lambda value: None if value is None else _inet(key, value)
    raise ValueError(unsupported(type_name))


def pseudonym(key: bytes, type_name: str, value: Any) -> Any:
    """The pseudonym of `value` for a column of `type_name` (None for None)."""
    return pseudonymiser(key, type_name)(value)


def is_pseudonym(type_name: str, value: Any) -> bool:
    """Whether `value` has the shape of a pseudonym for its column's type."""
    if value is None:
        return True
    if kind(type_name) == "text":
        return str(value).startswith(TAG)
    addr = ipaddress.ip_interface(str(value)).ip
    net = ipaddress.ip_network("240.0.0.0/4" if addr.version == 4 else "2001:db8::/32")
    return addr in net
