"""Keyed pseudonyms: deterministic under one key, different under another, valid for their
column types, NULL kept; checked against HMACs computed here."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator.evidence import pseudonym
from tests.helpers import inet_pseudonym, text_pseudonym

K1, K2 = b"k" * 32, b"j" * 32


@given(st.text(min_size=0, max_size=200))
def test_text_pseudonyms_are_keyed_macs(v):
    want = text_pseudonym(K1, v)
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
    assert pseudonym.pseudonym(K1, "inet", f"{addr}{mask}") == inet_pseudonym(K1, str(addr))


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
    assert pseudonym.pseudonym(K1, "inet", f"{addr}{mask}") == inet_pseudonym(K1, str(addr))


@pytest.mark.parametrize(
    "text", ["::ffff:198.51.100.7", "::198.51.100.7", "::1", "::", "2001:db8::1:0:0:1", "1:0:0:2:0:0:0:3/64"]
)
def test_ipv6_forms_that_print_differently_keep_their_pseudonym(text):
    # IPv4-mapped and -compatible addresses print dotted in C and in hex by ipaddress
    assert pseudonym.pseudonym(K1, "inet", text) == inet_pseudonym(K1, text)
