"""Validation messages name the field and the kind of problem, never a value that could be
a secret; a spec problem exits 2 with nothing written."""

from __future__ import annotations

import copy

import pytest

from migrator.errors import SpecError
from migrator.spec import parse_spec

SECRET = "s3cr3t-PASSWORD-9f7e"
BASE = {
    "regions": {"us": {"dsn": "postgresql://app@db-us/app"}, "ie": {"dsn": "postgresql://app@db-ie/app"}},
    "control": {"dsn": "postgresql://app@db-us/control"},
    "policy": {"IE": "ie"},
    "entity_graph": {"root": {"table": "users", "key": "id", "residency": "cc"}},
}


def _with(path: list, value) -> dict:
    spec = copy.deepcopy(BASE)
    node = spec
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    return spec


CASES = {
    "region as a bare DSN": (_with(["regions", "ie"], f"postgresql://app:{SECRET}@db-ie/app"), "regions.ie"),
    "control as a bare DSN": (_with(["control"], f"postgresql://app:{SECRET}@db-us/c"), "control"),
    "misspelled dsn": (_with(["regions", "ie"], {"dns": f"postgresql://app:{SECRET}@db-ie/app"}), "regions.ie.dns"),
    "an extra password field": (
        _with(["regions", "ie"], {"dsn": "postgresql://app@db-ie/app", "password": SECRET}),
        "regions.ie.password",
    ),
    "a numeric secret_key": (
        _with(
            ["objects"],
            {
                "user_prefix": "u/{user}/",
                "stores": {"us": {"bucket": "media-us", "secret_key": 982374659}, "ie": {"bucket": "media-ie"}},
            },
        ),
        "objects.stores.us.secret_key",
    ),
    "a keyword DSN": (_with(["regions", "ie"], f"host=db-ie password={SECRET}"), "regions.ie"),
    "a token in a list": (_with(["regions", "ie"], ["token", SECRET]), "regions.ie"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_validation_message_never_echoes_a_secret(name):
    spec, field = CASES[name]
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert field in msg
    assert SECRET not in msg and "982374659" not in msg


def test_a_harmless_value_is_still_shown():
    with pytest.raises(SpecError) as e:
        parse_spec(_with(["sharding"], {"shards_per_region": 0}))
    assert "sharding.shards_per_region" in str(e.value) and "(got 0)" in str(e.value)
