"""A different schema from its spec alone: UUID root keys, composite primary and foreign
keys, a two-hop table, text/jsonb/bytea/numeric/timestamptz columns and NULLs."""

from __future__ import annotations

import json

import psycopg
import pytest
import yaml

from tests.conftest import World, fresh_databases

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE SCHEMA crm;
CREATE TABLE crm.accounts (
  account_id uuid PRIMARY KEY, residence varchar(2), name text, joined timestamptz, credit numeric(12,4)
);
CREATE TABLE crm.documents (
  account_id uuid NOT NULL REFERENCES crm.accounts, doc_no int NOT NULL,
  body bytea, meta jsonb, price numeric, score double precision, signed_on date,
  PRIMARY KEY (account_id, doc_no)
);
CREATE TABLE crm.revisions (
  account_id uuid NOT NULL, doc_no int NOT NULL, rev int NOT NULL, content text, at timestamp,
  tags text[], span interval, PRIMARY KEY (account_id, doc_no, rev),
  FOREIGN KEY (account_id, doc_no) REFERENCES crm.documents
);
"""

SEED = """
INSERT INTO crm.accounts
SELECT md5('acct' || i)::uuid, (ARRAY['IE','NO','US',NULL,'FR','xx'])[1 + i % 6],
       CASE WHEN i % 4 = 0 THEN NULL ELSE 'Name ' || i || E' \\t tab' END,
       timestamptz '2026-01-01 00:00:00+05' + i * interval '1 hour 0.000001 seconds', i * 1.0001
FROM generate_series(1, 120) i;
INSERT INTO crm.documents
SELECT a.account_id, d, CASE WHEN d = 2 THEN NULL ELSE decode(md5(a.account_id::text || d), 'hex') END,
       CASE WHEN d = 1 THEN '{"b": 1, "a": [1, 2.50, null]}'::jsonb ELSE NULL END,
       d * 10.10, CASE WHEN d = 3 THEN 'NaN'::float8 ELSE 0.1 * d END, date '2026-02-01' + d
FROM crm.accounts a, generate_series(1, 3) d;
INSERT INTO crm.revisions
SELECT d.account_id, d.doc_no, r, CASE WHEN r = 2 THEN NULL ELSE 'rev ' || r END,
       timestamp '2026-03-01' + r * interval '1 day',
       CASE WHEN r = 1 THEN ARRAY['a "q"', NULL, E'b\\c', '{}'] END, r * interval '1 day 25 hours'
FROM crm.documents d, generate_series(1, 2) r;
"""


def _crm(cluster, tmp_path, **extra) -> World:
    dsn, control = fresh_databases(cluster, SCHEMA)
    with psycopg.connect(dsn["us"]) as c:
        c.execute(SEED)
    spec = {
        "version": 1,
        "source_region": "us",
        "regions": {r: {"dsn": d} for r, d in dsn.items()},
        "control": {"dsn": control},
        "policy": {"IE": "ie", "FR": "ie", "NO": "no", "US": "us"},
        "entity_graph": {
            "schema": "crm",
            "root": {"table": "accounts", "key": "account_id", "residency": "residence", "created_at": "joined"},
            "tables": [
                {"table": "documents", "parent": "accounts", "fk": {"account_id": "account_id"}},
                {"table": "revisions", "parent": "documents", "fk": {"account_id": "account_id", "doc_no": "doc_no"}},
            ],
        },
        "sharding": {"shards_per_region": 3},
        "copy": {"batch_users": 7},
        **extra,
    }
    path = tmp_path / "crm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return World(cluster, dsn, control, path, spec)


@pytest.mark.parametrize("protocol", ["tables", "stream"])
def test_uuid_composite_keys_and_two_hops_from_spec_alone(cluster, tmp_path, protocol):
    # each batch as a binary COPY per table, and as one stream of text (the protocol across an ocean)
    w = _crm(cluster, tmp_path, copy={"batch_users": 7, "protocol": protocol})
    res = w.migrator("run", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["unplaced_users"] == {"NULL": 20, "unknown:XX": 20}
    for region, codes in {"ie": ("IE", "FR"), "no": ("NO",)}.items():
        ids = [
            r[0] for r in w.rows("us", "SELECT account_id FROM crm.accounts WHERE residence = ANY(%s)", (list(codes),))
        ]
        assert ids
        for q in (
            "SELECT * FROM crm.accounts WHERE account_id = ANY(%s) ORDER BY 1",
            "SELECT * FROM crm.documents WHERE account_id = ANY(%s) ORDER BY 1, 2",
            "SELECT * FROM crm.revisions WHERE account_id = ANY(%s) ORDER BY 1, 2, 3",
        ):
            src, dst = w.rows("us", q, (ids,)), w.rows(region, q, (ids,))
            assert len(src) == len(dst) > 0
            assert repr(src) == repr(dst)  # NaN != NaN, so compare the exact text of every value
        assert w.rows(region, "SELECT count(*) FROM crm.accounts")[0][0] == len(ids)
    # a changed revision at the destination is named by its composite key
    acct = w.rows("ie", "SELECT account_id FROM crm.revisions ORDER BY 1 LIMIT 1")[0][0]
    w.rows(
        "ie",
        "UPDATE crm.revisions SET content = 'x' WHERE account_id = %s AND doc_no = 1 AND rev = 1 RETURNING 1",
        (acct,),
    )
    res = w.migrator("verify", "--region", "ie", "--json")
    assert res.returncode == 0 and "already cut_over" in res.stdout  # said so: verify's work was done
    res = w.migrator("verify", "--recheck", "--region", "ie", "--json")
    assert res.returncode == 1
    named = [d for s in json.loads(res.stdout)["shards"] for d in s.get("differences", [])]
    assert named == [
        {"table": "revisions", "pk": {"account_id": str(acct), "doc_no": "1", "rev": "1"}, "problem": "different"}
    ]


def test_the_second_schema_is_purged_from_its_spec_alone(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("CRM_KEY_IE", "crm-ie-key-0123456789abcdef")
    monkeypatch.setenv("CRM_KEY_NO", "crm-no-key-0123456789abcdef")
    purge = {
        "after": "0s",
        "tables": {"accounts": {"pseudonymise": ["name"]}, "documents": "keep"},  # revisions: deleted
        "keys": {"ie": {"env": "CRM_KEY_IE"}, "no": {"env": "CRM_KEY_NO"}},
    }
    w = _crm(cluster, tmp_path, purge=purge)
    assert w.migrator("run").returncode == 0
    moved = [r[0] for r in w.rows("us", "SELECT account_id FROM crm.accounts WHERE residence IN ('IE', 'FR', 'NO')")]
    docs = w.rows("us", "SELECT * FROM crm.documents WHERE account_id = ANY(%s) ORDER BY 1, 2", (moved,))
    names = dict(w.rows("us", "SELECT account_id, name FROM crm.accounts WHERE account_id = ANY(%s)", (moved,)))
    res = w.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert w.rows("us", "SELECT count(*) FROM crm.revisions WHERE account_id = ANY(%s)", (moved,)) == [(0,)]
    assert repr(w.rows("us", "SELECT * FROM crm.documents WHERE account_id = ANY(%s) ORDER BY 1, 2", (moved,))) == repr(
        docs
    )
    now = dict(w.rows("us", "SELECT account_id, name FROM crm.accounts WHERE account_id = ANY(%s)", (moved,)))
    assert set(now) == set(names)
    for acct, name in names.items():
        assert (now[acct] is None) == (name is None)
        assert name is None or (now[acct].startswith("pz1_") and now[acct] != name)
    staying = w.rows(
        "us", "SELECT count(*) FROM crm.revisions r JOIN crm.accounts a USING (account_id) WHERE a.residence = 'US'"
    )[0][0]
    assert staying > 0  # the users who stay keep everything
