"""The DAGs: they import cleanly without I/O, and a run migrates, rolls back a bad shard
and ends failed while the other shards cut over."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from tests.conftest import DEMO_OWNED, ROOT, World

airflow = pytest.importorskip("airflow.sdk")
pytestmark = pytest.mark.airflow


def test_dag_files_import_without_errors_or_io(tmp_path):
    code = """
import socket, sys
def refuse(*a, **k):
    raise AssertionError("a DAG file opened a network connection at parse time")
socket.socket.connect = refuse
socket.create_connection = refuse
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
names = {"residency_migration", "residency_rollback", "residency_release", "residency_purge", "residency_audit"}
assert set(bag.dags) == names, list(bag.dags)
dag = bag.dags["residency_migration"]
assert {"plan", "shard.copy", "shard.verify", "shard.cutover", "shard.rollback", "report"} <= set(dag.task_ids)
assert dag.params["scope"] == "interval"
assert {"select", "purge_shard", "report"} <= set(bag.dags["residency_purge"].task_ids)
print("ok")
"""
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_each_destination_region_has_its_group_on_its_queue_and_the_form_checks_values(world: World, tmp_path):
    code = """
import sys
from airflow.dag_processing.dagbag import DagBag
import copy
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
dag = bag.dags["residency_migration"]
for region in ("ie", "no"):
    for step in ("copy", "verify", "cutover", "rollback"):
        assert dag.get_task(f"{region}.{step}").queue == region
assert dag.get_task("plan").queue == "default"
schema = {k: dag.params.get_param(k).schema for k in dag.params}
for optional in ("regions", "shards", "dry_run", "batch_size", "spec"):
    assert "null" in schema[optional]["type"], optional
assert schema["regions"]["items"]["enum"] == ["ie", "no"]
assert schema["spec"]["enum"] == [None, "default", "other"]
def refused(**conf):
    try:
        for k, v in conf.items():
            copy.copy(dag.params.get_param(k)).resolve(v)
    except Exception:
        return True
    return False
assert refused(regions=["IE"]) and refused(batch_size=0) and refused(shards=["ie 03"]) and refused(spec="/etc/passwd")
assert not refused(regions=["ie"], shards=["ie-03"], batch_size=5, spec="other")
print("ok")
"""
    env = {
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": "/usr/bin:/bin",
        "MIGRATOR_SPEC": str(world.spec_path),
        "MIGRATOR_SPECS": f"other={world.spec_path}",
    }
    res = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_a_run_names_only_a_configured_spec(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from migrator.airflow.glue import spec_path

    monkeypatch.setenv("MIGRATOR_SPEC", "/srv/spec.yaml")
    monkeypatch.setenv("MIGRATOR_SPECS", "eu2=/srv/eu2.yaml")
    assert spec_path({}) == "/srv/spec.yaml" and spec_path({"spec": "eu2"}) == "/srv/eu2.yaml"
    with pytest.raises(AirflowFailException, match="not one of the configured specs"):
        spec_path({"spec": "/etc/passwd"})


def test_dag_run_migrates_and_rolls_back_a_bad_shard(world: World, tmp_path):
    from migrator.demo.airflow_run import run_dag

    # one user bound for ie already has a row at the destination: that shard must fail,
    # be rolled back, and fail the run, while every other shard cuts over
    uid = world.rows("us", "SELECT user_id FROM users WHERE country_code = 'DE' ORDER BY 1 LIMIT 1")[0][0]
    world.rows("ie", "INSERT INTO users VALUES (%s, 'x@example.test', NULL, 'DE', now(), NULL) RETURNING 1", (uid,))
    res = run_dag(world.spec_path, tmp_path)
    assert res.returncode != 0, "a run with a failed shard must not end green"
    shards = dict(world.ctl("SELECT s.shard_id, s.state FROM migrator.shard s"))
    bad = world.ctl("SELECT shard_id FROM migrator.shard_user WHERE user_key = %s", (str(uid),))[0][0]
    assert shards.pop(bad) == "rolled_back"
    assert shards and set(shards.values()) == {"cut_over"}
    # the rolled-back shard's users are back to being only at the source; the foreign row stays
    assert world.rows("ie", "SELECT count(*) FROM users WHERE user_id = %s", (uid,))[0][0] == 1
    moved = world.ctl("SELECT user_key::bigint, home FROM migrator.directory WHERE home <> 'us'")
    for region in ("ie", "no"):
        ids = [k for k, h in moved if h == region]
        for table, q in DEMO_OWNED.items():
            assert world.rows("us", q, (ids,)) == world.rows(region, q, (ids,)), table
    reasons = world.ctl("SELECT detail->>'reason' FROM migrator.audit WHERE to_state = 'rolling_back'")
    assert reasons and reasons[0][0].startswith("automatic")


def test_rerunning_a_finished_interval_changes_nothing(world: World, tmp_path):
    from migrator.demo.airflow_run import run_dag

    # two runs for the same logical date cover the same data interval, hence the same wave
    day = "2026-11-23T00:00:00+00:00"
    assert run_dag(world.spec_path, tmp_path / "a", {"scope": "interval"}, day).returncode == 0
    waves = world.ctl("SELECT DISTINCT wave FROM migrator.shard")
    assert len(waves) == 1
    before = world.ctl("SELECT user_key, home, epoch FROM migrator.directory ORDER BY 1")
    moves = world.ctl("SELECT count(*) FROM migrator.audit WHERE to_state IS NOT NULL")
    assert run_dag(world.spec_path, tmp_path / "b", {"scope": "interval"}, day).returncode == 0
    assert world.ctl("SELECT DISTINCT wave FROM migrator.shard") == waves
    assert world.ctl("SELECT user_key, home, epoch FROM migrator.directory ORDER BY 1") == before
    assert world.ctl("SELECT count(*) FROM migrator.audit WHERE to_state IS NOT NULL") == moves
    # and a scope=all run afterwards moves everyone else exactly once
    assert run_dag(world.spec_path, tmp_path / "c", {"scope": "all"}).returncode == 0
    assert world.ctl("SELECT DISTINCT epoch FROM migrator.directory") == [(1,)]
    # users whose country changes at their home are re-homed by the next scheduled run,
    # whatever its interval: every scheduled run reconciles homes with the policy
    moved = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie' LIMIT 2")]
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("UPDATE users SET country_code = 'SE' WHERE user_id = ANY(%s)", (moved,))
    later = "2026-11-24T00:00:00+00:00"
    assert run_dag(world.spec_path, tmp_path / "d", {"scope": "interval"}, later).returncode == 0
    homes = world.ctl("SELECT home, epoch FROM migrator.directory WHERE user_key = ANY(%s)", ([str(u) for u in moved],))
    assert homes == [("no", 2), ("no", 2)]
    assert world.rows("no", "SELECT count(*) FROM users WHERE user_id = ANY(%s)", (moved,)) == [(2,)]


def test_manual_rollback_and_release_dags_act_on_named_shards(world: World, tmp_path):
    from migrator.demo.airflow_run import run_dag

    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("run", "--region", "ie").returncode == 0
    res = run_dag(
        world.spec_path, tmp_path / "r", {"shards": ["ie-00"], "reason": "ticket 9"}, dag_id="residency_rollback"
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert world.ctl("SELECT state FROM migrator.shard WHERE name = 'ie-00'") == [("rolled_back",)]
    assert world.ctl("SELECT count(*) FROM migrator.directory WHERE home = 'ie'") == [(0,)]
    for table, q in DEMO_OWNED.items():
        assert world.rows("ie", q.replace("= ANY(%s)", "IS NOT NULL")) == [], table
    held = world.ctl("SELECT count(*), max(reason) FROM migrator.held_users")[0]
    assert held[0] > 0 and held[1] == "ticket 9"
    res = run_dag(
        world.spec_path,
        tmp_path / "s",
        {"shards": ["ie-00"], "reason": "fixed", "mode": "release"},
        dag_id="residency_release",
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert world.ctl("SELECT count(*) FROM migrator.held_users") == [(0,)]
    assert world.ctl(
        "SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'users released' AND detail->>'reason' = 'fixed'"
    ) == [(1,)]


def test_purge_dag_purges_every_due_shard(world: World, tmp_path, monkeypatch):
    from migrator.demo.airflow_run import run_dag

    monkeypatch.setenv("TEST_PSEUDONYM_KEY_IE", "ie-test-key-0123456789abcdef")
    world.write_spec(
        sharding={"shards_per_region": 1},
        purge={
            "after": "0s",
            "tables": {"users": {"pseudonymise": ["email", "display_name"]}, "login_events": "keep"},
            "keys": {"ie": {"env": "TEST_PSEUDONYM_KEY_IE"}},
        },
    )
    assert world.migrator("run", "--region", "ie").returncode == 0
    users = [
        int(k)
        for (k,) in world.ctl(
            "SELECT user_key FROM migrator.shard_user JOIN migrator.shard USING (shard_id) WHERE region = 'ie'"
        )
    ]
    kept = world.rows("us", "SELECT count(*) FROM login_events WHERE user_id = ANY(%s)", (users,))[0][0]
    res = run_dag(world.spec_path, tmp_path / "p", {"dry_run": True}, dag_id="residency_purge")
    assert res.returncode == 0, res.stdout[-3000:]
    assert world.ctl("SELECT DISTINCT state FROM migrator.shard WHERE region = 'ie'") == [("cut_over",)]
    res = run_dag(world.spec_path, tmp_path / "q", {}, dag_id="residency_purge")
    assert res.returncode == 0, res.stdout[-3000:]
    assert world.ctl("SELECT DISTINCT state FROM migrator.shard WHERE region = 'ie'") == [("purged",)]
    assert world.rows("us", "SELECT count(*) FROM videos WHERE user_id = ANY(%s)", (users,)) == [(0,)]
    assert world.rows("us", "SELECT count(*) FROM login_events WHERE user_id = ANY(%s)", (users,)) == [(kept,)]
    assert world.rows("us", "SELECT count(*) FROM users WHERE user_id = ANY(%s) AND email LIKE 'pz1_%%'", (users,)) == [
        (len(users),)
    ]
    # the hourly audit is green, and fails naming the drift once a stray row appears
    res = run_dag(world.spec_path, tmp_path / "a", {}, dag_id="residency_audit")
    assert res.returncode == 0, res.stdout[-3000:]
    stray = world.rows("us", "SELECT user_id FROM users WHERE country_code = 'US' ORDER BY 1 LIMIT 1")[0][0]
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("SET migrator.apply = 'on'")
        c.execute("SET session_replication_role = replica")  # past the foreign key: its user is not here
        c.execute("INSERT INTO devices (user_id, device_no, phone) VALUES (%s, 1, NULL)", (stray,))
    res = run_dag(world.spec_path, tmp_path / "b", {}, dag_id="residency_audit")
    assert res.returncode != 0
    assert "stray rows at a destination region ie table devices" in res.stdout, res.stdout[-3000:]
