"""Keyed pseudonyms: deterministic under one key, different under another, valid for their
column types, NULL kept; checked against HMACs computed here."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator import pseudonym

K1, K2 = b"k" * 32, b"j" * 32


@given(st.text(min_size=0, max_size=200))
def test_text_pseudonyms_are_keyed_macs(v):
    want = "pz1_" + hmac.new(K1, f"text:{v}".encode(), hashlib.sha256).hexdigest()[:32]
    assert pseudonym.pseudonym(K1, "text", v) == want == pseudonym.pseudonym(K1, "text", v)
    assert pseudonym.pseudonym(K2, "text", v) != want


@given(st.integers(min_value=12, max_value=64), st.text(min_size=1, max_size=80))
def test_varchar_pseudonyms_fit(n, v):
    out = pseudonym.pseudonym(K1, f"character varying({n})", v)
    assert len(out) <= n and out.startswith("pz1_")


@given(st.ip_addresses())
def test_inet_pseudonyms_are_reserved_addresses(addr):
    out = ipaddress.ip_address(pseudonym.pseudonym(K1, "inet", str(addr)))
    assert out.version == addr.version
    assert out in ipaddress.ip_network("240.0.0.0/4" if addr.version == 4 else "2001:db8::/32")
    assert pseudonym.pseudonym(K1, "inet", str(addr)) == str(out)


def test_null_stays_null_and_other_types_are_refused():
    assert pseudonym.pseudonym(K1, "text", None) is None
    assert pseudonym.pseudonym(K1, "inet", None) is None
    assert pseudonym.unsupported("bigint") and "bigint" in pseudonym.unsupported("bigint")
    assert pseudonym.unsupported("character varying(8)")
    assert pseudonym.unsupported("text") is None and pseudonym.unsupported("inet") is None
    with pytest.raises(ValueError):
        pseudonym.pseudonym(K1, "timestamp with time zone", "2026-01-01")


@given(st.ip_addresses(v=4), st.sampled_from(["", "/32", "/24"]))
def test_ipv4_pseudonyms_are_the_keyed_mac_of_the_address(addr, mask):
    # as PostgreSQL's inet::text prints it, with or without the mask
    mac = int.from_bytes(hmac.new(K1, f"inet:{addr}".encode(), hashlib.sha256).digest(), "big")
    want = str(ipaddress.IPv4Address((240 << 24) | (mac & ((1 << 28) - 1))))
    assert pseudonym.pseudonym(K1, "inet", f"{addr}{mask}") == want


def _ipv6_reference(key: bytes, text: str) -> str:
    """The IPv6 pseudonym computed with ipaddress alone: the MAC of the address as ipaddress
    prints it, its low 96 bits under 2001:db8::/32 (what every earlier purge wrote)."""
    addr = ipaddress.IPv6Address(text.partition("/")[0])
    mac = int.from_bytes(hmac.new(key, f"inet:{addr}".encode(), hashlib.sha256).digest(), "big")
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) | (mac & ((1 << 96) - 1))))


_HEXTET = st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xDB8]) | st.integers(0, 0xFFFF)


@given(
    st.ip_addresses(v=6)
    | st.lists(_HEXTET, min_size=8, max_size=8).map(
        lambda h: ipaddress.IPv6Address(sum(x << (16 * (7 - i)) for i, x in enumerate(h)))
    ),
    st.sampled_from(["", "/128", "/64"]),
)
def test_ipv6_pseudonyms_are_the_keyed_mac_of_the_address(addr, mask):
    # runs of zero hextets of every length and place, as PostgreSQL's inet::text prints them
    assert pseudonym.pseudonym(K1, "inet", f"{addr}{mask}") == _ipv6_reference(K1, str(addr))


@pytest.mark.parametrize(
    "text", ["::ffff:198.51.100.7", "::198.51.100.7", "::1", "::", "2001:db8::1:0:0:1", "1:0:0:2:0:0:0:3/64"]
)
def test_ipv6_forms_that_print_differently_keep_their_pseudonym(text):
    # IPv4-mapped and -compatible addresses print dotted in C and in hex by ipaddress
    assert pseudonym.pseudonym(K1, "inet", text) == _ipv6_reference(K1, text)
