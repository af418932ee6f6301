"""The audit in a living system: no alarm for a move in progress, the application's own
writes or a schema change made everywhere; a finding for each planted blind spot (a
swapped manifest, a source copy changed after its freeze, a purged shard's rows against
the policy its purge applied, with or without a purge section in the spec now)."""

from __future__ import annotations

import time

import psycopg
import pytest

from migrator.demo.workload import Writer, check
from tests.conftest import World
from tests.helpers import movers
from tests.integration.test_audit import _audit, _reader
from tests.integration.test_evidence import _with_evidence

pytestmark = pytest.mark.integration

KEY = "ie-audit-key-0123456789abcdef"


def _past_guard(world: World, region: str, sql: str, args: tuple = ()) -> int:
    """A change made past the migrator's guard, as only someone bypassing the application could."""
    with psycopg.connect(world.dsn[region]) as c:
        c.execute("SET LOCAL migrator.apply = 'on'")
        return c.execute(sql, args).rowcount


def _audited(world: World, tmp_path) -> tuple[int, dict]:
    """`migrator audit --json` by a role that can only read (granted what exists now)."""
    return _audit(world, _reader(world, tmp_path))


def _kinds(doc: dict) -> set[tuple]:
    return {(f["kind"], f.get("shard"), f.get("table")) for f in doc["findings"]}


def test_no_alarm_for_a_move_in_progress_the_applications_writes_or_a_schema_change(
    world: World, tmp_path, monkeypatch
):
    _with_evidence(world, monkeypatch)
    world.write_spec(sharding={"shards_per_region": 2}, copy={"batch_users": 10})
    # the copy window: rows at ie for users still homed at us
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--region", "ie").returncode == 0
    rc, doc = _audited(world, tmp_path)
    assert rc == 0, doc.get("findings", doc)
    flying = doc["residency"]["regions"]["ie"]["users_in_flight"]
    moving = world.ctl(
        "SELECT count(*) FROM migrator.shard_user su JOIN migrator.shard s USING (shard_id) WHERE s.region = 'ie'"
    )[0][0]
    assert flying["users"] == moving > 0
    # cut over with the application writing, and writing on at the new homes
    writer = Writer(world.dsn, world.control, movers(world)).start()
    res = world.migrator("run", "--region", "ie")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    time.sleep(3)
    acked = writer.stop()
    assert not writer.errors, writer.errors[:5]
    check(world.dsn, world.control, acked)
    rc, doc = _audited(world, tmp_path)
    assert rc == 0, doc.get("findings", doc)
    assert {d["kind"] for d in doc["drift"]} == {"the application wrote after cutover"}
    # a column added everywhere, in a table the application did not write
    for dsn in world.dsn.values():
        with psycopg.connect(dsn) as c:
            c.execute("ALTER TABLE devices ADD COLUMN note text DEFAULT 'n/a'")
    rc, doc = _audited(world, tmp_path)
    assert rc == 0, doc.get("findings", doc)
    schema = [(d["kind"], d["table"]) for d in doc["drift"] if d["table"] == "devices"]
    assert schema == [("schema changed since the manifest; rows as recorded", "devices")] * 2
    # two shards' manifests swapped: each names a shard it is not kept under
    (a, b) = [s for (s,) in world.ctl("SELECT shard_id FROM migrator.shard WHERE region = 'ie' ORDER BY 1")]
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("UPDATE migrator.manifests SET shard_id = CASE shard_id WHEN %s THEN %s ELSE %s END", (a, b, a))
    rc, doc = _audited(world, tmp_path)
    assert rc == 1
    swapped = {(f["kind"], f["shard"]) for f in doc["findings"]}
    assert swapped == {("manifest names another shard or region than where it is kept", s) for s in (a, b)}


def test_source_copies_and_purged_shards_are_held_to_their_freeze_and_receipts(world: World, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_AUDIT_KEY_IE", KEY)
    world.write_spec(
        sharding={"shards_per_region": 2},
        purge={
            "after": "0s",
            "tables": {"users": {"pseudonymise": ["email"]}, "devices": "keep"},
            "keys": {"ie": {"env": "TEST_AUDIT_KEY_IE"}},
        },
    )
    assert world.migrator("run", "--region", "ie").returncode == 0
    (purged, kept) = [s for (s,) in world.ctl("SELECT shard_id FROM migrator.shard WHERE region = 'ie' ORDER BY 1")]
    assert world.migrator("purge", "--shard", purged.split("/")[1]).returncode == 0
    assert world.ctl("SELECT shard_id, state FROM migrator.shard WHERE region = 'ie' ORDER BY 1") == [
        (purged, "purged"),
        (kept, "cut_over"),
    ]
    # the policy changed since (every table deleted now): the purge is held to the policy
    # it applied, not to this one
    world.write_spec(purge={"after": "0s"})
    rc, doc = _audited(world, tmp_path)
    assert rc == 0, doc.get("findings", doc)
    # the spec no longer says anything about purging: the receipts still do
    del world.spec["purge"]
    world.write_spec()
    rc, doc = _audited(world, tmp_path)
    assert rc == 0, doc.get("findings", doc)
    assert doc["residency"]["source"]["copies_checked_against_their_freeze"] == 1

    def first(sid: str) -> int:
        return int(world.ctl("SELECT min(user_key::bigint) FROM migrator.shard_user WHERE shard_id = %s", (sid,))[0][0])

    p, k = first(purged), first(kept)
    assert _past_guard(world, "us", "DELETE FROM devices WHERE user_id = %s", (p,)) > 0  # a kept table
    assert _past_guard(world, "us", "UPDATE users SET email = 'back@example.test' WHERE user_id = %s", (p,)) == 1
    assert _past_guard(world, "us", "INSERT INTO login_events VALUES (99999999, %s, '192.0.2.9', now(), true)", (p,))
    assert _past_guard(world, "us", "UPDATE videos SET title = 'edited' WHERE user_id = %s", (k,)) > 0
    rc, doc = _audited(world, tmp_path)
    assert rc == 1
    assert _kinds(doc) == {
        ("a kept table's rows differ from the purge's receipt", purged, "devices"),
        ("original values in a pseudonymised column", purged, "users"),
        ("purged users' rows back at the source", purged, "login_events"),
        ("the source copy changed since the cutover froze it", kept, "videos"),
    }
    assert "back@example.test" not in str(doc) and "edited" not in str(doc)


def test_rows_cut_from_the_chains_tail_are_found_before_any_move(world: World, tmp_path):
    """Heads are kept after every phase, not only after a move: the audit rows of a copy,
    cut from the end of the chain before anything cut over, are found."""
    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--region", "ie").returncode == 0
    rc, doc = _audited(world, tmp_path)
    assert rc == 0, doc.get("findings", doc)
    assert doc["chain"]["heads"]["ie"] >= 1 and doc["chain"]["after_last_head"] == 0
    (last,) = world.ctl("SELECT max(seq) FROM migrator.audit")[0]
    with psycopg.connect(world.control) as c:
        c.execute("DELETE FROM migrator.audit WHERE seq > %s", (last - 2,))
    rc, doc = _audited(world, tmp_path)
    assert rc == 1
    assert ("audit history rewritten before a head kept in the region", None, None) in _kinds(doc)
