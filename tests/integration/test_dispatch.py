"""One phase machine: every (state, phase) pair gets the same answer through the command
line and through what the Airflow tasks call, and that answer is the table below, written
out here independently of `migrator.dispatch`. Rollback from every state."""

from __future__ import annotations

import json
import signal
import time

import psycopg
import pytest
from typer.testing import CliRunner

from migrator.airflow import tasks
from migrator.cli.main import app
from migrator.control.context import Context
from migrator.control.state import State
from migrator.lifecycle import dispatch, gate
from migrator.spec import load_spec
from tests.conftest import DEMO_OWNED, World
from tests.helpers import paused

pytestmark = pytest.mark.integration

R, S, X = "run", "skip", "refuse"
STATES = [
    "planned", "copying", "copied", "verified", "cut_over", "failed", "rolling_back", "rolled_back", "purging", "purged"
]  # fmt: skip
EXPECTED = {  # phase -> its answer in each of STATES, in order
    "copy": [R, R, S, S, S, R, X, X, S, S],
    "verify": [X, X, R, S, S, X, X, X, S, S],
    "recheck": [X, X, X, R, R, X, X, X, X, X],
    "cutover": [X, X, X, R, S, X, X, X, S, S],
    "rollback": [R, R, R, R, R, R, R, S, X, X],
    "rollback_failed": [S, S, S, S, S, R, S, S, S, S],  # the DAG's automatic rollback: the task path only
    "cleanup": [X, X, X, X, R, X, X, R, X, S],
    "release": [X, X, X, X, X, X, X, R, X, X],
    "retry": [X, X, X, X, X, X, X, R, X, X],
    "purge": [X, X, X, X, R, X, X, X, R, S],  # its --dry-run says what it would purge: the task path only
}
CLI = {"recheck": ["verify", "--recheck"]}


def test_every_state_and_phase_answered_alike_by_the_cli_and_the_tasks(world: World):
    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan").returncode == 0
    sid = "default/ie-00"
    spec = load_spec(world.spec_path)
    runner = CliRunner()
    assert set(EXPECTED) == set(gate.PHASES)
    for i, state in enumerate(STATES):
        with psycopg.connect(world.control) as c:
            c.execute("UPDATE migrator.shard SET state = %s WHERE shard_id = %s", (state, sid))
        for phase, answers in EXPECTED.items():
            args = [
                *CLI.get(phase, [phase]),
                "--shard",
                "ie-00",
                "--dry-run",
                "--json",
                "--config",
                str(world.spec_path),
            ]
            task = tasks.phase(spec, "test", sid, phase, dry_run=True)
            assert task["would"] == answers[i], (state, phase, task)
            assert task["state"] == state
            if phase in ("purge", "rollback_failed"):
                continue
            res = runner.invoke(app, args)
            assert res.exit_code == 0, res.output
            (row,) = json.loads(res.output)["shards"]
            assert (row["would"], row["why"]) == (task["would"], task["why"]), (state, phase)
            if task["would"] == X:
                assert "next:" in task["why"], task  # a refusal says what to do next


def _wave(w: World, wave: str, *cmds: str) -> None:
    for cmd in cmds:
        res = w.migrator(cmd, "--wave", wave, "--region", "ie")
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])


def _rolled_back_cleanly(w: World, wave: str) -> None:
    res = w.migrator("rollback", "--wave", wave, "--region", "ie", "--reason", f"from {wave}", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert w.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (f"{wave}/ie-00",)) == [("rolled_back",)]
    assert w.ctl("SELECT count(*) FROM migrator.directory WHERE home <> 'us'")[0][0] == 0
    for t in DEMO_OWNED:
        assert w.rows("ie", f"SELECT count(*) FROM {t}")[0][0] == 0, (wave, t)
    for r in ("us", "ie"):
        if w.rows(r, "SELECT to_regclass('migrator.fences')")[0][0]:
            assert w.rows(r, "SELECT count(*) FROM migrator.fences")[0][0] == 0, (wave, r)
    # held: the next plan leaves them alone until released
    n = w.ctl("SELECT count(*) FROM migrator.held_users WHERE shard_id = %s", (f"{wave}/ie-00",))[0][0]
    assert n == w.ctl("SELECT users FROM migrator.shard WHERE shard_id = %s", (f"{wave}/ie-00",))[0][0] > 0
    res = w.migrator("release", "--wave", wave, "--shard", "ie-00", "--reason", "next state")
    assert res.returncode == 0, res.stderr
    if wave == "w-cut":  # status tells released from held
        (row,) = json.loads(w.migrator("status", "--wave", wave, "--region", "ie", "--json").stdout)["shards"]
        assert row["users_held"] == 0


def test_rollback_from_every_state_including_a_rollback_killed_halfway(world: World):
    world.write_spec(sharding={"shards_per_region": 1})
    _wave(world, "w-planned", "plan")
    _rolled_back_cleanly(world, "w-planned")

    _wave(world, "w-copying", "plan")
    proc = paused(world, "catch_up", "copy", "--wave", "w-copying", "--region", "ie")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert world.ctl("SELECT state FROM migrator.shard WHERE shard_id = 'w-copying/ie-00'") == [("copying",)]
    _rolled_back_cleanly(world, "w-copying")

    _wave(world, "w-copied", "plan", "copy")
    _rolled_back_cleanly(world, "w-copied")
    _wave(world, "w-verified", "plan", "copy", "verify")
    _rolled_back_cleanly(world, "w-verified")
    _wave(world, "w-cut", "plan", "copy", "verify", "cutover")
    _rolled_back_cleanly(world, "w-cut")

    _wave(world, "w-failed", "plan", "copy")
    tamper = "UPDATE users SET email = 'tampered@example.test' WHERE user_id = (SELECT min(user_id) FROM users)"
    # these users left ie when w-cut rolled back: ie refuses their writes...
    with pytest.raises(psycopg.Error) as refused:
        world.rows("ie", tamper + " RETURNING 1")
    assert refused.value.sqlstate == "RMF01"
    with psycopg.connect(world.dsn["ie"]) as c:  # ...but not a change made past the guard
        c.execute("SET LOCAL migrator.apply = 'on'")
        assert c.execute(tamper).rowcount == 1
    assert world.migrator("verify", "--wave", "w-failed", "--region", "ie").returncode == 1
    assert world.ctl("SELECT state FROM migrator.shard WHERE shard_id = 'w-failed/ie-00'") == [("failed",)]
    _rolled_back_cleanly(world, "w-failed")

    # a rollback killed after it decided (destination fence held, directory not yet back)
    _wave(world, "w-half", "plan", "copy", "verify", "cutover")
    proc = paused(world, "rollback held", "rollback", "--wave", "w-half", "--region", "ie", "--reason", "half")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while world.ctl("SELECT state FROM migrator.shard WHERE shard_id = 'w-half/ie-00'") != [
        (State.ROLLING_BACK.value,)
    ]:
        assert time.monotonic() < deadline, "the rollback's flip back was not completed by recovery"
        time.sleep(0.2)
    reason = world.ctl(
        "SELECT detail->>'reason' FROM migrator.audit WHERE shard_id = 'w-half/ie-00' "
        "AND detail->>'completed_by' = 'recovery'"
    )
    assert reason == [("half",)]
    _rolled_back_cleanly(world, "w-half")


def test_a_rolled_back_shard_is_held_then_moved_again_in_its_own_wave(world: World):
    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("run", "--region", "ie").returncode == 0
    assert world.migrator("rollback", "--shard", "ie-00", "--reason", "ticket 7").returncode == 0
    # status tells held from released
    (row,) = json.loads(world.migrator("status", "--region", "ie", "--json").stdout)["shards"]
    assert row["state"] == "rolled_back" and row["users_held"] == row["users"] > 0
    assert "(held)" in world.migrator("status", "--region", "ie").stdout
    # a scope=all style run in a new wave leaves the held users where they are
    res = world.migrator("run", "--wave", "later", "--region", "ie", "--json")
    assert res.returncode == 0
    assert all(s["users"] == 0 or not s["name"].startswith("ie-") for s in json.loads(res.stdout)["shards"])
    assert world.ctl("SELECT count(*) FROM migrator.directory WHERE home = 'ie'")[0][0] == 0
    res = world.migrator("run", "--region", "ie", "--json")
    assert res.returncode == 1 and "held" in res.stdout  # its wave's run says why it stays
    res = world.migrator("retry", "--shard", "ie-00", "--reason", "fixed")
    assert res.returncode == 0, res.stderr
    res = world.migrator("run", "--region", "ie", "--json")
    assert res.returncode == 0, res.stdout[-2000:]
    assert (
        world.ctl(
            "SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'moved again' AND detail->>'reason' = 'fixed'"
        )[0][0]
        == 1
    )


def test_a_shard_name_in_several_waves_is_refused_with_the_list(world: World):
    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan", "--wave", "a").returncode == 0
    assert world.migrator("run", "--wave", "a", "--region", "ie").returncode == 0
    assert world.migrator("rollback", "--wave", "a", "--region", "ie", "--reason", "x").returncode == 0
    assert world.migrator("release", "--shard", "a/ie-00", "--reason", "x").returncode == 0
    assert world.migrator("plan", "--wave", "b").returncode == 0
    res = world.migrator("rollback", "--shard", "ie-00", "--reason", "which one?")
    assert res.returncode == 2
    assert "a/ie-00" in res.stderr and "b/ie-00" in res.stderr
    # the superseded shard no longer fails its own wave's run
    assert world.migrator("run", "--wave", "b", "--region", "ie").returncode == 0
    res = world.migrator("run", "--wave", "a", "--region", "ie", "--json")
    assert res.returncode == 0, res.stdout[-2000:]


def test_the_run_verdict_names_shards_not_cut_over_and_shards_with_no_record(world: World):
    assert world.migrator("plan").returncode == 0
    spec = load_spec(world.spec_path)
    ids = [sid for (sid,) in world.ctl("SELECT shard_id FROM migrator.shard ORDER BY shard_id")]
    with pytest.raises(tasks.MigratorError) as e:
        tasks.verdict(spec, ids)
    assert f"{len(ids)} of {len(ids)} shard(s) did not cut over" in str(e.value) and f"{ids[0]} is planned" in str(
        e.value
    )
    assert world.migrator("run").returncode == 0
    assert tasks.verdict(spec, ids) == {"shards": len(ids), "cut_over": len(ids)}
    # a shard the plan's output names but the control database no longer holds is no success
    with pytest.raises(tasks.MigratorError) as e:
        tasks.verdict(spec, [*ids, "default:ie-99"])
    assert f"1 of {len(ids) + 1} shard(s) did not cut over: default:ie-99 has no record" in str(e.value)


def test_a_phase_run_right_after_another_finds_the_shard_free(world: World):
    """Phases run back to back, as a script or the benchmark runs them, never find the
    shard still held by the one before: its lock is let go when the phase returns, not
    when its server process gets round to exiting (on a busy server, after the next phase
    had asked for the shard and been told another worker holds it)."""
    from migrator.control.context import Context
    from migrator.spec import parse_spec

    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--shard", "ie-00").returncode == 0
    ctx = Context(parse_spec(world.spec))
    held_after = []
    with psycopg.connect(world.control, autocommit=True) as watcher:
        for _ in range(150):
            assert dispatch.run_phase(ctx, "default/ie-00", "copy", reason="back to back").skipped
            # an advisory lock anyone still holds on the control database, the moment the phase is back
            held_after.append(
                watcher.execute(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()"
                ).fetchone()[0]
            )
    assert sum(held_after) == 0, f"the shard was still held after {sum(map(bool, held_after))} of 150 phases"
    assert world.ctl("SELECT state FROM migrator.shard WHERE shard_id = 'default/ie-00'") == [("copied",)]


def test_an_approvers_answer_counts_for_its_run_until_the_next_verify(world: World):
    """What the DAG's cutover task acts on when it is retried: the answer recorded in this
    run since the shard's last verify. Approved: cut over. Rejected: rolled back with the
    reason, and acting on it again changes nothing."""
    world.write_spec(sharding={"shards_per_region": 2})
    assert world.migrator("plan").returncode == 0
    for step in ("copy", "verify"):
        assert world.migrator(step).returncode == 0
    spec = load_spec(world.spec_path)
    yes, no, later = "default/ie-00", "default/ie-01", "default/no-00"
    assert tasks.cutover_answer(spec, "r1", yes) is None

    out = tasks.answer_cutover(spec, "r1", yes, True, "alice", "")
    assert not out.get("skipped") and out["state"] == "cut_over", out
    assert tasks.cutover_answer(spec, "r1", yes)["by"] == "alice"
    assert tasks.cutover_answer(spec, "r2", yes) is None  # another run's answer is not this run's

    out = tasks.answer_cutover(spec, "r1", no, False, "bob", "ticket 7")
    assert "rejected by bob" in out["skipped"], out
    again = tasks.act_on_answer(spec, "r1", no, tasks.cutover_answer(spec, "r1", no))
    assert again == out  # a retried task: the same result, nothing more done
    states = dict(world.ctl("SELECT shard_id, state FROM migrator.shard"))
    assert states[yes] == "cut_over" and states[no] == "rolled_back", states
    reasons = world.ctl(
        "SELECT detail->>'reason' FROM migrator.audit WHERE shard_id = %s AND detail->>'event' = 'rollback started'",
        (no,),
    )
    assert reasons == [("cutover rejected by bob: ticket 7",)]
    digest = world.ctl("SELECT digest FROM migrator.shard WHERE shard_id = %s", (yes,))[0][0]
    assert tasks.cutover_answer(spec, "r1", yes)["digest"] == digest  # what the approver was shown

    # an answer recorded, then the shard verified again: the next try asks again
    answer = {"event": tasks.APPROVED, "by": "carol"}
    Context(spec, "r3").control.keep(later, answer, approval={**answer, "run_id": "r3"})  # as answer_cutover keeps it
    assert tasks.cutover_answer(spec, "r3", later)["by"] == "carol"
    assert world.migrator("verify", "--recheck", "--shard", "no-00").returncode == 0
    assert tasks.cutover_answer(spec, "r3", later) is None
