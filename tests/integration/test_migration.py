"""A whole migration against real servers, checked the way a user would check it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from migrator import partition
from tests.conftest import DEMO_OWNED, World

pytestmark = pytest.mark.integration


def expected_homes(w: World) -> dict[str, list[int]]:
    """Region -> user ids, from the source rows and the policy, computed here."""
    policy = w.spec["policy"]
    out: dict[str, list[int]] = {}
    for uid, code in w.rows("us", "SELECT user_id, country_code FROM users"):
        region = policy.get(code) if code else None
        if region and region != "us":
            out.setdefault(region, []).append(uid)
    return out


def assert_destination_equals_source(w: World, homes: dict[str, list[int]]) -> None:
    for region, ids in homes.items():
        for table, q in DEMO_OWNED.items():
            src = w.rows("us", q, (ids,))
            dst = w.rows(region, q, (ids,))
            assert src == dst, f"{region}.{table} differs from the source subset"
            assert len(dst) > 0
        # nothing else arrived at the destination
        total = w.rows(region, "SELECT count(*) FROM users")[0][0]
        assert total == len(ids)


@pytest.mark.parametrize(
    "copy",
    [None, {"workers": 1, "inline_digest": True, "batch_users": 7}],
    ids=["defaults", "one-worker-inline-digest"],
)
def test_whole_migration_copies_exactly_the_policy_subset(world: World, copy):
    if copy:
        world.write_spec(copy=copy)
    res = world.migrator("run", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    homes = expected_homes(world)
    assert set(homes) == {"ie", "no"}
    assert_destination_equals_source(world, homes)
    # the directory names the new home of every moved user, epoch 1; nobody else moved
    directory = dict(world.ctl("SELECT user_key, home FROM migrator.directory"))
    for region, ids in homes.items():
        assert all(directory[str(i)] == region for i in ids)
    assert {h for h in directory.values()} == {"ie", "no"}
    assert {e for (e,) in world.ctl("SELECT DISTINCT epoch FROM migrator.directory")} == {1}
    # users with no or an unknown residency were reported, not moved
    unknown = world.rows("us", "SELECT count(*) FROM users WHERE country_code IS NULL OR country_code IN ('ZZ', 'GB')")[
        0
    ][0]
    assert sum(doc["unplaced_users"].values()) == unknown > 0
    assert all(s["state"] == "cut_over" and s["digest"] for s in doc["shards"])
    assert doc["totals"]["users"] == sum(len(v) for v in homes.values())
    # the source keeps its rows until a later purge
    assert world.rows("us", "SELECT count(*) FROM users")[0][0] == 400
    # every transition is in the audit trail
    moves = world.ctl("SELECT from_state, to_state FROM migrator.audit WHERE shard_id IS NOT NULL ORDER BY id")
    for step in [("planned", "copying"), ("copying", "copied"), ("copied", "verified"), ("verified", "cut_over")]:
        assert moves.count(step) == len(doc["shards"])


def test_rerun_of_finished_shards_changes_nothing(world: World):
    assert world.migrator("run").returncode == 0
    before = {r: world.rows(r, "SELECT count(*), sum(hashtext(t::text)) FROM login_events t") for r in ("ie", "no")}
    audit_before = world.ctl("SELECT count(*) FROM migrator.audit WHERE to_state IS NOT NULL")
    epochs = world.ctl("SELECT sum(epoch) FROM migrator.directory")
    res = world.migrator("run", "--json")
    assert res.returncode == 0, res.stderr
    assert {
        r: world.rows(r, "SELECT count(*), sum(hashtext(t::text)) FROM login_events t") for r in ("ie", "no")
    } == before
    assert world.ctl("SELECT count(*) FROM migrator.audit WHERE to_state IS NOT NULL") == audit_before
    assert world.ctl("SELECT sum(epoch) FROM migrator.directory") == epochs


def test_killed_process_resumes_without_duplicates(world: World):
    world.write_spec(copy={"batch_users": 5}, sharding={"shards_per_region": 1})
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator.cli", "run", "--config", str(world.spec_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline:
        try:
            done = world.ctl("SELECT count(*) FROM migrator.checkpoint")[0][0]
        except psycopg.Error:
            done = 0
        if done >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= 3, "the copy never got going"
    states = dict(world.ctl("SELECT name, state FROM migrator.shard"))
    assert "copying" in states.values(), f"expected a shard interrupted mid-copy, got {states}"
    res = world.migrator("run", "--json")
    assert res.returncode == 0, res.stderr
    homes = expected_homes(world)
    assert_destination_equals_source(world, homes)
    # checkpoints cover every batch exactly once
    batches = world.ctl("SELECT sum(batches) FROM migrator.shard")[0][0]
    assert world.ctl("SELECT count(*) FROM migrator.checkpoint")[0][0] == batches


def test_plan_places_each_user_by_hash_in_key_ordered_batches(world: World):
    """The plan is formed in the databases; its membership is checked here against the
    policy, the shard hash computed in Python, and the batch size."""
    world.write_spec(copy={"batch_users": 7}, sharding={"shards_per_region": 3})
    assert world.migrator("plan").returncode == 0
    homes = {str(u): r for r, ids in expected_homes(world).items() for u in ids}
    members = world.ctl(
        "SELECT s.region, s.idx, s.batches, su.user_key, su.batch_no "
        "FROM migrator.shard_user su JOIN migrator.shard s USING (shard_id)"
    )
    assert {k: r for r, _, _, k, _ in members} == homes
    assert all(idx == partition.shard_index(k, 3) for _, idx, _, k, _ in members)
    by_batch: dict[tuple, list[int]] = {}
    for r, idx, n, k, b in members:
        assert 0 <= b < n
        by_batch.setdefault((r, idx, b), []).append(int(k))
    for (r, idx, b), keys in by_batch.items():
        assert 0 < len(keys) <= 7
        later = by_batch.get((r, idx, b + 1))
        assert later is None or max(keys) < min(later), "batches follow the key order"
        assert b == 0 or (r, idx, b - 1) in by_batch
    assert len({(r, i) for r, i, _ in by_batch}) == len(world.ctl("SELECT 1 FROM migrator.shard"))
    # as even as they divide, and as many as a multiple of the two lanes that copy them
    for r, idx, n in {(r, idx, n) for r, idx, n, _, _ in members}:
        sizes = [len(keys) for (r2, i2, _), keys in by_batch.items() if (r2, i2) == (r, idx)]
        assert len(sizes) == n and max(sizes) - min(sizes) <= 1
        assert n % 2 == 0 or n == sum(sizes), (r, idx, sizes)
        assert max(sizes) <= 7 and (n == 2 or 7 * (n - 2) < sum(sizes)), "no more batches than it takes"
    # a second wave leaves out everyone already in a live shard
    res = world.migrator("plan", "--wave", "second", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["shards"] == []


def test_plan_counts_small_shards_exactly_and_estimates_large_ones(world: World, monkeypatch):
    """Each shard's rows per table: exact when the shard is no larger than the sample,
    otherwise scaled up from the sampled users, and marked as such."""
    from migrator.control.context import Context
    from migrator.phases import plan as planner
    from migrator.spec import parse_spec

    world.write_spec(sharding={"shards_per_region": 2})
    ctx = Context(parse_spec(world.spec))
    monkeypatch.setattr(planner, "MEASURE_SAMPLE", 10)
    sampled = planner.plan(ctx, "w", dry_run=True).shards
    monkeypatch.undo()
    counted = planner.plan(ctx, "w").shards
    assert len(sampled) == len(counted) == 4
    for s, c in zip(sampled, counted):
        assert s.shard_id == c.shard_id and s.users == c.users > 10
        assert c.sampled == c.users and c.summary()["rows_exact"]
        assert s.sampled == 10 and not s.summary()["rows_exact"]
        # the exact counts, against the source rows of the shard's users counted here
        ids = [
            int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.shard_user WHERE shard_id = %s", (c.shard_id,))
        ]
        assert len(ids) == c.users
        for table, q in DEMO_OWNED.items():
            n = len(world.rows("us", q, (ids,)))
            assert c.rows[table] == n, (c.name, table)
            assert abs(s.rows[table] - n) <= 0.5 * n, (s.name, table, s.rows[table], n)


def test_rows_the_destination_silently_drops_stop_the_copy(world: World):
    """A destination trigger that swallows some rows: the batch's counts disagree, the copy
    stops naming the table, and the batch is not committed there."""
    world.write_spec(sharding={"shards_per_region": 1})
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("""CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS
                     $$BEGIN IF NEW.event_id % 7 = 0 THEN RETURN NULL; END IF; RETURN NEW; END$$""")
        c.execute("CREATE TRIGGER swallow BEFORE INSERT ON login_events FOR EACH ROW EXECUTE FUNCTION swallow()")
    assert world.migrator("plan").returncode == 0
    res = world.migrator("copy", "--region", "ie", "--json")
    assert res.returncode != 0
    assert "login_events" in res.stdout + res.stderr and "the destination took" in res.stdout + res.stderr
    assert world.rows("ie", "SELECT count(*) FROM login_events")[0][0] == 0
    assert world.rows("ie", "SELECT count(*) FROM users")[0][0] == 0
    assert world.ctl("SELECT count(*) FROM migrator.checkpoint")[0][0] == 0
    states = {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'ie'")}
    assert states == {"failed"}


def test_corrupted_destination_row_is_caught_and_named(world: World):
    assert world.migrator("copy").returncode == 0  # plans nothing: copy needs a plan first
    assert world.migrator("plan").returncode == 0
    res = world.migrator("copy", "--region", "ie", "--json")
    assert res.returncode == 0, res.stderr
    victim = world.rows("ie", "SELECT c.comment_id FROM comments c ORDER BY 1 LIMIT 1")[0][0]
    secret = "tampered-text-that-must-not-leak"
    world.rows("ie", "UPDATE comments SET body = %s WHERE comment_id = %s RETURNING 1", (secret, victim))
    res = world.migrator("verify", "--region", "ie", "--json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    named = [d for s in doc["shards"] for d in s.get("differences", [])]
    assert named == [{"table": "comments", "pk": {"comment_id": str(victim)}, "problem": "different"}]
    assert secret not in res.stdout + res.stderr
    bad = [s for s in doc["shards"] if s.get("differences")][0]
    assert bad["state"] == "failed"
    # a failed shard cannot be cut over; the directory still says us
    res = world.migrator("cutover", "--shard", bad["name"], "--json")
    assert res.returncode == 1
    assert world.ctl("SELECT count(*) FROM migrator.directory WHERE home <> 'us'")[0][0] == 0


def test_rollback_before_and_after_cutover(world: World):
    assert world.migrator("plan").returncode == 0
    # before cutover: copied shards' rows leave the destination, the directory never moved
    assert world.migrator("copy", "--region", "no").returncode == 0
    assert world.rows("no", "SELECT count(*) FROM users")[0][0] > 0
    res = world.migrator("rollback", "--region", "no", "--reason", "test", "--json")
    assert res.returncode == 0, res.stderr
    for t in DEMO_OWNED:
        assert world.rows("no", f"SELECT count(*) FROM {t}")[0][0] == 0
    assert world.ctl("SELECT count(*) FROM migrator.directory WHERE home <> 'us' OR epoch <> 0")[0][0] == 0
    # after cutover: directory back to us with a new epoch, then the rows go
    assert world.migrator("run", "--region", "ie").returncode == 0
    ie_users = world.ctl("SELECT count(*) FROM migrator.directory WHERE home = 'ie' AND epoch = 1")[0][0]
    assert ie_users > 0
    res = world.migrator("rollback", "--region", "ie", "--reason", "test", "--json")
    assert res.returncode == 0, res.stderr
    assert world.ctl("SELECT count(*) FROM migrator.directory WHERE home = 'us' AND epoch = 2")[0][0] == ie_users
    for t in DEMO_OWNED:
        assert world.rows("ie", f"SELECT count(*) FROM {t}")[0][0] == 0
    # twice is harmless
    res = world.migrator("rollback", "--region", "ie", "--json")
    assert res.returncode == 0
    assert world.ctl("SELECT count(*) FROM migrator.directory WHERE epoch = 2")[0][0] == ie_users
    reasons = world.ctl("SELECT DISTINCT detail->>'reason' FROM migrator.audit WHERE to_state = 'rolling_back'")
    assert reasons == [("test",)]


def test_dry_run_writes_nothing(world: World):
    res = world.migrator("run", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dry_run"] and doc["shards"] and all(s["users"] > 0 for s in doc["shards"])
    assert world.rows("ie", "SELECT count(*) FROM users")[0][0] == 0
    assert world.ctl("SELECT to_regclass('migrator.shard')")[0][0] is None


def test_plan_warns_of_an_owner_key_without_an_index(world: World):
    res = world.migrator("plan", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["warnings"] == []
    with psycopg.connect(world.dsn["us"], autocommit=True) as c:
        c.execute("DROP INDEX comments_video")
    with psycopg.connect(world.dsn["no"], autocommit=True) as c:
        c.execute("DROP INDEX login_events_user")
        # neither an index led by an expression nor a partial one serves the owner key
        c.execute("CREATE INDEX login_events_expr ON login_events ((user_id + 0), user_id)")
        c.execute("CREATE INDEX login_events_some ON login_events (user_id) WHERE user_id > 0")
    res = world.migrator("plan", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    warnings = json.loads(res.stdout)["warnings"]
    assert len(warnings) == 2
    assert warnings[0].startswith("source us: table public.comments has no index on (video_id)")
    assert warnings[1].startswith("destination no: table public.login_events has no index on (user_id)")
    text = world.migrator("plan", "--dry-run").stdout
    assert "warning:" in text and "public.comments has no index on (video_id)" in " ".join(text.split())
    assert "a rollback (or a purge) deletes" in warnings[1]  # a destination's index serves deletes too
    res = world.migrator("plan", "--dry-run", "--strict", "--json")
    assert res.returncode == 2 and "public.comments has no index on (video_id)" in res.stderr
    world.write_spec(require_indexes=True)
    res = world.migrator("plan", "--json")
    assert res.returncode == 2 and "destination no: table public.login_events" in res.stderr
    assert world.ctl("SELECT to_regclass('migrator.shard')")[0][0] is None


def test_reports_tell_the_truth_about_a_planned_and_a_finished_wave(world: World):
    first = json.loads(world.migrator("plan", "--json").stdout)
    assert first["unplaced_users"] and first["staying_users"]["us"] > 0
    assert all(s["approx_bytes"] > 0 for s in first["shards"])
    # the same wave planned again: the same users left where they are, not none
    again = json.loads(world.migrator("plan", "--json").stdout)
    assert again["already_planned"] and again["unplaced_users"] == first["unplaced_users"]
    assert again["staying_users"] == first["staying_users"]
    # counted independently: users whose residency the policy does not place
    placed = list(world.spec["policy"])
    (n,) = world.rows(
        "us", "SELECT count(*) FROM users WHERE country_code IS NULL OR NOT country_code = ANY(%s)", (placed,)
    )[0]
    assert sum(first["unplaced_users"].values()) == n
    assert world.migrator("run").returncode == 0
    done = json.loads(world.migrator("plan", "--json").stdout)
    assert done["totals"]["states"] == {"cut_over": len(first["shards"])}
    # a graph that changed since the wave was planned is refused, dry run or not
    world.spec["entity_graph"]["tables"] = [t for t in world.spec["entity_graph"]["tables"] if t["table"] != "devices"]
    world.spec["entity_graph"]["exclude"] = [{"table": "devices", "reason": "left out of this spec"}]
    world.write_spec()
    for args in (("plan", "--dry-run"), ("plan",)):
        res = world.migrator(*args)
        assert res.returncode == 2 and "removed: devices" in res.stderr, res.stderr
