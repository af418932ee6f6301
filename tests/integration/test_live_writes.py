"""Zero lost writes: the application keeps writing while shards move, cut over and roll back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import psycopg
import pytest

from migrator.demo.workload import Writer, check
from tests.conftest import DEMO_OWNED, World
from tests.helpers import far, movers, no_capture_left, paused_cutover, start, verified_region

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _stop_writers(monkeypatch):
    """Writers left running by a failing test are stopped before its servers go away."""
    started: list[Writer] = []
    real = Writer.start

    def start(self):
        started.append(self)
        return real(self)

    monkeypatch.setattr(Writer, "start", start)
    yield
    for w in started:
        w.stop_flag.set()
    for w in started:
        w.stop()


@pytest.mark.parametrize("link", ["loopback", "across the relay"])
def test_writes_during_migration_are_all_kept(world: World, link: str):
    world.write_spec(copy={"batch_users": 10})
    writer = Writer(world.dsn, world.control, movers(world)).start()
    time.sleep(1)
    # across the relay: the migrator beside the source, Ireland and Norway an ocean away, the
    # application writing beside each server
    with far(world) if link != "loopback" else nullcontext():
        res = world.migrator("run", "--json")
    time.sleep(1)  # the writer goes on at the new homes
    acked = writer.stop()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert not writer.errors, writer.errors[:5]
    assert acked.ops > 100
    assert all(s["state"] == "cut_over" for s in json.loads(res.stdout)["shards"])
    check(world.dsn, world.control, acked)
    # the source of each shard is read-only after cutover, enforced by the source itself
    uid = world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie' LIMIT 1")[0][0]
    with pytest.raises(psycopg.Error) as e:
        world.rows("us", "UPDATE users SET email = 'x' WHERE user_id = %s RETURNING 1", (int(uid),))
    assert e.value.sqlstate == "RMF01"
    fences = world.ctl(
        "SELECT (detail->>'fence_ms')::float FROM migrator.audit WHERE detail->>'event' = 'fence closed'"
    )
    assert len(fences) == len(json.loads(res.stdout)["shards"]) and all(f > 0 for (f,) in fences)


def test_rollback_after_cutover_carries_destination_writes_back(world: World):
    world.write_spec(copy={"batch_users": 25})
    writer = Writer(world.dsn, world.control, movers(world)).start()
    res = world.migrator("run")
    assert res.returncode == 0, res.stderr
    time.sleep(2)  # writes land at ie and no
    at_dest = writer.acked.ops
    res = world.migrator("rollback", "--reason", "test", "--json")
    time.sleep(1)
    acked = writer.stop()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert acked.ops > at_dest > 0 and not writer.errors, writer.errors[:5]
    assert world.ctl("SELECT count(*) FROM migrator.directory WHERE home <> 'us'")[0][0] == 0
    check(world.dsn, world.control, acked)  # everything, including what was written at ie/no, is at us
    for r in ("ie", "no"):
        for t in DEMO_OWNED:
            assert world.rows(r, f"SELECT count(*) FROM {t}")[0][0] == 0
    no_capture_left(world)


def test_fence_that_cannot_finish_lifts_and_loses_nothing(world: World):
    world.write_spec(changes={"fence_window_s": 1.0}, copy={"batch_users": 50})
    writer = Writer(world.dsn, world.control, movers(world)).start()
    assert world.migrator("run", "--region", "ie").returncode == 0
    assert world.migrator("copy", "--region", "no").returncode == 0
    assert world.migrator("verify", "--region", "no").returncode == 0
    # the Norwegian destination stalls just before the fence goes up (its guards and capture
    # list are in place): a long lock on a table of the graph. Every pending change is left
    # for inside the fence (a pass before it would give up on the lock after
    # changes.lock_wait_s, the case of test_catch_up_before_the_fence_gives_up_on_a_held_lock).
    world.write_spec(changes={"fence_window_s": 1.0, "catch_up_below": 10**9}, copy={"batch_users": 50})
    t0 = time.monotonic()
    proc = paused_cutover(world, "no", "staged")
    stall = psycopg.connect(world.dsn["no"])
    try:
        stall.execute("LOCK TABLE login_events IN ACCESS EXCLUSIVE MODE")
        out, _ = proc.communicate(timeout=120)
    finally:  # a failure here must not leave the lock (or the command) to the next tests
        took = time.monotonic() - t0
        stall.rollback()
        stall.close()
        proc.kill()
    assert proc.returncode == 1
    doc = json.loads(out)
    assert all(s["state"] == "verified" for s in doc["shards"])
    assert "fence window" in " ".join(s.get("error") or "" for s in doc["shards"])
    # the fence lifted: a Norwegian user can write at the source again
    uid = world.ctl(
        "SELECT user_key FROM migrator.directory WHERE user_key IN "
        "(SELECT user_key FROM migrator.shard_user su JOIN migrator.shard s USING (shard_id) "
        "WHERE s.region = 'no') LIMIT 1"
    )[0][0]
    world.rows(
        "us", "UPDATE users SET email = 'still-writable@example.test' WHERE user_id = %s RETURNING 1", (int(uid),)
    )
    assert took < 60
    world.write_spec(changes={"fence_window_s": 1.0}, copy={"batch_users": 50})
    res = world.migrator("cutover", "--region", "no", "--json")  # retried later, it goes through
    assert res.returncode == 0, res.stdout[-2000:]
    time.sleep(0.5)
    acked = writer.stop()
    assert not writer.errors, writer.errors[:5]
    check(world.dsn, world.control, acked)
    lifted = world.ctl("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'fence lifted'")[0][0]
    assert lifted >= 1


def test_catch_up_before_the_fence_gives_up_on_a_held_lock(world: World):
    """A table locked at the destination while a shard still has changes to catch up: the
    cutover gives up after `changes.lock_wait_s` with a transient error and no fence, and
    goes through once the lock is gone."""
    world.write_spec(changes={"catch_up_below": 0, "lock_wait_s": 1.0}, copy={"batch_users": 50})
    uid = verified_region(world, "no")
    world.rows("us", "UPDATE users SET email = 'after-verify@example.test' WHERE user_id = %s RETURNING 1", (uid,))
    stall = psycopg.connect(world.dsn["no"])
    stall.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    t0 = time.monotonic()
    res = world.migrator("cutover", "--region", "no", "--json", timeout=120)
    took = time.monotonic() - t0
    stall.rollback()
    stall.close()
    assert res.returncode == 1
    shards = json.loads(res.stdout)["shards"]
    assert all(s["state"] == "verified" for s in shards)
    assert "waited over 1.0 s for a lock" in " ".join(s.get("error") or "" for s in shards)
    assert took < 60
    # no fence was raised: the user still writes at the source
    world.rows("us", "UPDATE users SET display_name = 'still writable' WHERE user_id = %s RETURNING 1", (uid,))
    res = world.migrator("cutover", "--region", "no", "--json")
    assert res.returncode == 0, res.stdout[-2000:]
    assert world.rows("no", "SELECT email, display_name FROM users WHERE user_id = %s", (uid,)) == [
        ("after-verify@example.test", "still writable")
    ]


@pytest.mark.parametrize("where", ["catch_up", "fenced"])
def test_killed_during_catch_up_or_fence_then_rerun(world: World, where):
    world.write_spec(changes={"fence_window_s": 3.0}, copy={"batch_users": 50}, sharding={"shards_per_region": 1})
    writer = Writer(world.dsn, world.control, movers(world)).start()
    env = {**__import__("os").environ, "MIGRATOR_PAUSE_AT": where, "MIGRATOR_PAUSE_S": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator.cli", "run", "--region", "ie", "--config", str(world.spec_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = {
        "catch_up": "SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'paused at catch_up'",
        "fenced": "SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'paused at fenced'",
    }[where]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if world.ctl(marker)[0][0]:
                break
        except psycopg.Error:
            pass
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    uid = int(world.ctl("SELECT min(user_key::bigint) FROM migrator.shard_user")[0][0])
    if where == "fenced":
        # the fence expires by itself: the killed worker cannot leave users unwritable
        time.sleep(4.5)
    world.rows("us", "UPDATE users SET email = 'writable@example.test' WHERE user_id = %s RETURNING 1", (uid,))
    res = world.migrator("run", "--region", "ie", "--json")
    time.sleep(0.5)
    acked = writer.stop()
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert not writer.errors, writer.errors[:5]
    check(world.dsn, world.control, acked)


def test_status_shows_lag_and_cleanup_removes_capture(world: World):
    writer = Writer(world.dsn, world.control, movers(world)).start()
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy").returncode == 0
    time.sleep(1)  # the writer adds changes not yet caught up
    doc = json.loads(world.migrator("status", "--json").stdout)
    lags = [s["lag"] for s in doc["shards"]]
    assert all(isinstance(n, int) for n in lags) and sum(lags) > 0
    res = world.migrator("run", "--json")
    assert res.returncode == 0, res.stdout[-2000:]
    acked = writer.stop()
    check(world.dsn, world.control, acked)
    assert world.migrator("cleanup").returncode == 0
    no_capture_left(world, regions=("ie", "no"))
    # the source keeps only the fence: moved users' rows stay read-only there, nothing is logged
    assert world.rows("us", "SELECT count(*) FROM migrator.changes")[0][0] == 0
    assert world.rows("us", "SELECT count(*) FROM migrator.capture_users")[0][0] == 0
    assert world.rows("us", "SELECT count(*) FROM migrator.fenced_users")[0][0] > 0
    res = world.migrator("rollback", "--json")
    assert res.returncode == 1 and "finalized" in res.stdout


def test_a_write_open_when_capture_starts_reaches_the_destination(world: World):
    """A transaction that wrote a moving user's row just before the shard's change capture
    began (the guards already in place for another shard), and commits only later: the copy
    waits for it, so its row is copied rather than missed by both the copy and the log."""
    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--region", "ie").returncode == 0  # the source's guards are installed
    (uid,) = world.ctl(
        "SELECT su.user_key FROM migrator.shard_user su JOIN migrator.shard s USING (shard_id) "
        "WHERE s.region = 'no' ORDER BY 1 LIMIT 1"
    )[0]
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute("UPDATE users SET email = 'late@example.test' WHERE user_id = %s", (int(uid),))
        proc = subprocess.Popen(
            [sys.executable, "-m", "migrator.cli", "copy", "--region", "no", "--config", str(world.spec_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(4)
        finished_early = proc.poll() is not None
        copied_early = world.ctl(
            "SELECT count(*) FROM migrator.checkpoint cp JOIN migrator.shard s USING (shard_id) WHERE s.region = 'no'"
        )[0][0]
    # committed: the copy goes on
    assert proc.wait(120) == 0
    assert not finished_early and copied_early == 0, "the copy did not wait for the open transaction"
    res = world.migrator("verify", "--region", "no", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert world.rows("no", "SELECT email FROM users WHERE user_id = %s", (int(uid),)) == [("late@example.test",)]


def test_a_change_that_commits_after_a_later_one_is_not_passed_over(world: World):
    """Two writers of a moving shard: the first to log its change commits last. The log's
    ids follow the order the writers reached the trigger, not the order they committed, so
    a catch-up that ran between the two commits must not move past the first writer's
    change: it reaches the destination and the shard cuts over."""
    world.write_spec(sharding={"shards_per_region": 1}, changes={"catch_up_below": 0})
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--region", "ie").returncode == 0
    first, second = [
        int(k)
        for (k,) in world.ctl(
            "SELECT su.user_key FROM migrator.shard_user su JOIN migrator.shard s USING (shard_id) "
            "WHERE s.region = 'ie' ORDER BY su.user_key::bigint LIMIT 2"
        )
    ]
    slow = psycopg.connect(world.dsn["us"])
    slow.execute("UPDATE users SET email = 'first-logged-last-committed@example.test' WHERE user_id = %s", (first,))
    world.rows("us", "UPDATE users SET email = 'second@example.test' WHERE user_id = %s RETURNING 1", (second,))
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator.cli", "verify", "--region", "ie", "--config", str(world.spec_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc.wait(8)  # a catch-up pass runs while the first writer is still open
    except subprocess.TimeoutExpired:
        pass
    slow.commit()
    slow.close()
    assert proc.wait(120) == 0
    res = world.migrator("cutover", "--region", "ie", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    emails = dict(world.rows("ie", "SELECT user_id, email FROM users WHERE user_id = ANY(%s)", ([first, second],)))
    assert emails == {first: "first-logged-last-committed@example.test", second: "second@example.test"}


def test_a_changed_row_that_differs_stops_the_cutover_before_the_fence(world: World):
    """Rows changed since the copy are compared before the fence goes up, right after a
    catch-up: one that still differs (here: written at the destination behind the
    migrator's back) stops the cutover with the row named, and nobody is fenced."""
    world.write_spec(sharding={"shards_per_region": 1}, changes={"catch_up_below": 0})
    uid = verified_region(world, "ie")
    world.rows("us", "UPDATE users SET email = 'changed@example.test' WHERE user_id = %s RETURNING 1", (uid,))
    proc = paused_cutover(world, "ie", "settled")
    # the change has been caught up; now the destination's copy of that row is altered
    assert world.rows("ie", "SELECT email FROM users WHERE user_id = %s", (uid,)) == [("changed@example.test",)]
    world.rows("ie", "UPDATE users SET email = 'tampered@example.test' WHERE user_id = %s RETURNING 1", (uid,))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    (shard,) = json.loads(out)["shards"]
    assert shard["state"] == "failed"  # a difference that persists is terminal: the shard is failed, not fenced
    assert "differ before the fence" in shard["error"] and "@example.test" not in out
    assert shard["differences"] == [{"table": "users", "pk": {"user_id": str(uid)}, "problem": "different"}]
    assert (
        world.ctl("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'cutover stopped before the fence'")[0][
            0
        ]
        == 1
    )
    assert world.ctl("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'fence lifted'")[0][0] == 0
    assert world.ctl("SELECT home FROM migrator.directory WHERE user_key = %s", (str(uid),)) == [("us",)]
    assert world.rows("us", "SELECT count(*) FROM migrator.fences")[0][0] == 0
    world.rows("us", "UPDATE users SET email = 'still-writable@example.test' WHERE user_id = %s RETURNING 1", (uid,))


def test_two_cutovers_at_once_both_go_through(world: World):
    """Two regions cut over by two processes at the same time, the control database on the
    source's server: each holds its directory flip open across its fence window, both at
    once (a flip locks its own shard, not every flip), and neither window may wait on the
    other's open flip."""
    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan").returncode == 0
    for region in ("ie", "no"):
        assert world.migrator("copy", "--region", region).returncode == 0
        assert world.migrator("verify", "--region", region).returncode == 0
    # both pause just before their fences, so their flips are open at the same time unless kept apart
    pause = {"MIGRATOR_PAUSE_AT": "staged", "MIGRATOR_PAUSE_S": "3"}
    procs = [
        start(world, "cutover", "--region", region, "--json", env=pause, out=subprocess.PIPE) for region in ("ie", "no")
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {s["state"] for out in outs for s in json.loads(out)["shards"]} == {"cut_over"}
    assert world.ctl("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'fence lifted'")[0][0] == 0
    # and their flips were open at once: each paused with its flip open before either cut over
    (paused,) = world.ctl("SELECT max(at), count(*) FROM migrator.audit WHERE detail->>'event' = 'paused at staged'")
    (first_cut,) = world.ctl("SELECT min(at) FROM migrator.audit WHERE to_state = 'cut_over'")[0]
    assert paused[1] == 2 and paused[0] < first_cut, (paused, first_cut)


def test_the_fence_is_one_switch_over_a_staged_list(world: World):
    """The fence list is written with the fence down (the users still write); raising,
    expiring, holding and lifting the fence each change only whether their writes pass."""
    from migrator import capture
    from migrator.control.context import Context
    from migrator.spec import parse_spec

    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--region", "ie").returncode == 0  # the source's guards are installed
    ctx = Context(parse_spec(world.spec))
    (sid,) = [s.shard_id for s in ctx.control.shards() if s.region == "ie"]
    uid = int(world.ctl("SELECT user_key FROM migrator.shard_user WHERE shard_id = %s LIMIT 1", (sid,))[0][0])
    src = world.dsn["us"]

    def writes() -> bool:
        try:
            world.rows(
                "us", "UPDATE users SET email = %s WHERE user_id = %s RETURNING 1", (f"{time.time()}@x.test", uid)
            )
            return True
        except psycopg.Error as e:
            assert e.sqlstate == capture.FENCED
            return False

    capture.stage_fence(src, sid, ctx.control)
    assert world.rows("us", "SELECT count(*) FROM migrator.fenced_users WHERE shard_id = %s", (sid,))[0][0] > 0
    assert writes(), "a staged list alone fences nobody"
    capture.fence(src, sid, time.monotonic() + 0.5)
    assert not writes()
    time.sleep(2.0)  # past the window and its one-second grace: the fence expired by itself
    assert writes()
    capture.fence(src, sid, time.monotonic() + 5)
    capture.hold_fence(src, sid)
    time.sleep(6.5)
    assert not writes(), "a held fence does not expire"
    capture.lift(src, sid)
    assert writes()
    assert world.rows("us", "SELECT count(*) FROM migrator.fenced_users WHERE shard_id = %s", (sid,))[0][0] == 0


def test_a_fence_kept_by_an_earlier_version_still_holds(world: World):
    """A source whose fence list carries each user's own `until` (the earlier layout), with a
    cut-over shard's users fenced for good: installing the guards keeps them fenced."""
    from migrator import capture
    from migrator.control.context import Context
    from migrator.spec import parse_spec

    (uid,) = world.rows("us", "SELECT user_id FROM users ORDER BY 1 LIMIT 1")[0]
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute("CREATE SCHEMA migrator")
        c.execute(
            "CREATE TABLE migrator.fenced_users (user_key text PRIMARY KEY, shard_id text NOT NULL, "
            "until timestamptz NOT NULL DEFAULT 'infinity')"
        )
        c.execute("INSERT INTO migrator.fenced_users (user_key, shard_id) VALUES (%s, 'old/ie-0')", (str(uid),))
    ctx = Context(parse_spec(world.spec))
    capture.install(ctx, world.dsn["us"])
    assert world.rows("us", "SELECT shard_id, until = 'infinity' FROM migrator.fences") == [("old/ie-0", True)]
    with pytest.raises(psycopg.Error) as e:
        world.rows("us", "UPDATE users SET email = 'x@x.test' WHERE user_id = %s RETURNING 1", (uid,))
    assert e.value.sqlstate == capture.FENCED
    capture.install(ctx, world.dsn["us"])  # a second install changes nothing
    assert world.rows("us", "SELECT count(*) FROM migrator.fences")[0][0] == 1


def test_control_database_on_a_server_of_its_own(world: World):
    """The control database away from the source (here on the Norwegian server): the flip
    held open across the fence is on another server, nothing on the source waits for it,
    and writes during the move are all kept."""
    control = world.cluster["no"].create_database(f"control_apart_{int(time.time() * 1000)}")
    world.write_spec(control={"dsn": control}, sharding={"shards_per_region": 1}, copy={"batch_users": 25})
    writer = Writer(world.dsn, control, movers(world)).start()
    res = world.migrator("run", "--region", "ie", "--json")
    time.sleep(0.5)
    acked = writer.stop()
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert not writer.errors, writer.errors[:5]
    check(world.dsn, control, acked)
    with psycopg.connect(control) as c:
        closed = c.execute("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'fence closed'").fetchone()[0]
        lifted = c.execute("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'fence lifted'").fetchone()[0]
    assert (closed, lifted) == (1, 0)
