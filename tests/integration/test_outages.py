"""Outages are ridden out and resumed, never turned into rollbacks; errors name the store."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psycopg
import pytest

from migrator.demo import seed
from migrator.demo.embedded import Cluster
from tests.conftest import DEMO_OWNED, World, demo_spec

pytestmark = pytest.mark.integration

IE_CODES = ["IE", "DE", "FR", "IT", "ES", "NL", "PL", "PT", "AT", "BE"]


def same_at(w: World, region: str, codes: list[str]) -> None:
    ids = [r[0] for r in w.rows("us", "SELECT user_id FROM users WHERE country_code = ANY(%s)", (codes,))]
    assert ids
    for table, q in DEMO_OWNED.items():
        assert w.rows("us", q, (ids,)) == w.rows(region, q, (ids,)), table


@pytest.fixture
def control_apart(cluster, tmp_path):
    """The demo world with its control database on a server of its own, so it can stop alone."""
    ctl = Cluster(["ctl"], base=tmp_path / "ctl").start()
    dsn = {r: cluster[r].create_database(f"out_{tmp_path.name}"[:60]) for r in ("us", "ie", "no")}
    for d in dsn.values():
        with psycopg.connect(d) as c:
            c.execute(seed.schema_sql())
    seed.seed(dsn["us"], 400)
    control = ctl["ctl"].create_database("control")
    w = World(cluster, dsn, control, tmp_path / "spec.yaml", demo_spec(dsn, control, batch_users=10))
    w.write_spec()
    yield w, ctl["ctl"]
    ctl.remove()


def test_control_database_down_two_seconds_mid_run_the_run_completes(control_apart):
    w, server = control_apart
    assert w.migrator("plan").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator.cli", "run", "--json", "--config", str(w.spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while w.ctl("SELECT count(*) FROM migrator.checkpoint")[0][0] < 3:
        assert proc.poll() is None
        time.sleep(0.02)
    server.stop("immediate")
    down_mid_run = proc.poll() is None
    time.sleep(2)
    server.start()
    out, err = proc.communicate(timeout=600)
    assert down_mid_run
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert {s["state"] for s in json.loads(out)["shards"]} == {"cut_over"}
    same_at(w, "ie", IE_CODES)
    same_at(w, "no", ["NO", "SE", "DK"])


def test_one_region_down_fails_only_its_shards_and_they_resume(world: World):
    world.write_spec(retry={"attempts": 2, "initial_wait_s": 0.1, "max_wait_s": 0.2, "outage_s": 1})
    server = world.cluster["ie"]
    server.stop()
    try:
        res = world.migrator("run", "--json")
    finally:
        server.start()
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    states = {s["name"]: s["state"] for s in doc["shards"]}
    assert {v for k, v in states.items() if k.startswith("no-")} == {"cut_over"}
    assert {v for k, v in states.items() if k.startswith("ie-")} == {"planned"}  # resumable, never rolled back
    err = [s["error"] for s in doc["shards"] if s["name"].startswith("ie-")][0]
    assert f"region ie (127.0.0.1:{server.port}/" in err and "connection refused" in err
    assert any("destination ie cannot be reached" in x for x in doc["warnings"])
    res = world.migrator("run", "--json")
    assert res.returncode == 0, res.stdout[-2000:]
    same_at(world, "ie", IE_CODES)


def test_a_missing_database_is_named_with_the_store_and_no_password(world: World):
    dsn = world.dsn["ie"].rsplit("/", 1)[0].replace("postgres@", "postgres:hunter2secret@") + "/no_such_db"
    world.write_spec(regions={**world.spec["regions"], "ie": {"dsn": dsn}})
    res = world.migrator("plan", "--json")
    assert res.returncode == 2  # the spec's DSN is wrong: waiting does not mend it
    out = res.stdout + res.stderr
    assert "region ie" in out and "does not exist" in out and "hunter2secret" not in out


def test_concurrent_runs_both_exit_by_the_final_states(world: World):
    world.write_spec(copy={"batch_users": 10})
    assert world.migrator("plan").returncode == 0
    cmd = [sys.executable, "-m", "migrator.cli", "run", "--json", "--config", str(world.spec_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
        assert {s["state"] for s in json.loads(out)["shards"]} == {"cut_over"}


def test_plan_names_every_missing_privilege_before_writing(world: World):
    role = f"limited_{world.spec_path.parent.name}"[:60].lower().replace("-", "_")
    with psycopg.connect(world.cluster["ie"].dsn(), autocommit=True) as c:
        c.execute(f'CREATE ROLE "{role}" LOGIN')
    db = world.dsn["ie"].rsplit("/", 1)[1]
    with psycopg.connect(world.dsn["ie"], autocommit=True) as c:
        c.execute(f'REVOKE CREATE ON DATABASE "{db}" FROM PUBLIC')
        c.execute(f'GRANT SELECT, UPDATE, DELETE, TRIGGER ON ALL TABLES IN SCHEMA public TO "{role}"')
        c.execute(f'GRANT INSERT ON users, comments, login_events, devices TO "{role}"')  # not videos
    limited = world.dsn["ie"].replace("postgres@", f"{role}@", 1)
    world.write_spec(regions={**world.spec["regions"], "ie": {"dsn": limited}})
    res = world.migrator("plan", "--json")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"destination ie: role {role} lacks INSERT on table public.videos" in res.stderr
    assert f"destination ie: role {role} lacks CREATE on the database" in res.stderr
    assert world.ctl("SELECT to_regclass('migrator.shard')") == [(None,)]  # nothing planned, nothing written


@pytest.mark.parametrize(
    "statement, named, secret",
    [
        (
            "INSERT INTO users VALUES (1, 'dup-secret@example.test', NULL, 'DE', now(), NULL), "
            "(1, 'dup-secret@example.test', NULL, 'DE', now(), NULL)",
            ["users_pkey", "table users", "23505"],
            "dup-secret",
        ),
        (
            "INSERT INTO users VALUES (2, NULL, 'nn-secret', 'DE', now(), NULL)",
            ["column email", "table users", "23502"],
            "nn-secret",
        ),
        (
            "SELECT 1 FROM users u JOIN videos v ON v.user_id::text = u.user_id",
            ["operator does not exist", "42883"],
            None,
        ),
        ("SELECT 'value-secret'::int", ["22P02"], "value-secret"),
    ],
)
def test_driver_errors_name_the_store_and_objects_never_values(world: World, statement, named, secret):
    from migrator.errors import describe
    from migrator.stores.postgres import connect, name_store

    name_store(world.dsn["ie"], "region ie")
    with pytest.raises(psycopg.Error) as e, connect(world.dsn["ie"]) as c:
        c.execute(statement)
    said = describe(e.value)
    assert said.startswith(f"region ie (127.0.0.1:{world.cluster['ie'].port}/"), said
    for n in named:
        assert n in said, said
    if secret:
        assert secret not in said


def test_a_missing_privilege_at_run_time_is_named(world: World):
    from migrator.errors import describe
    from migrator.stores.postgres import connect, name_store

    role = f"ro_{world.spec_path.parent.name}"[:60].lower().replace("-", "_")
    with psycopg.connect(world.dsn["ie"], autocommit=True) as c:
        c.execute(f'CREATE ROLE "{role}" LOGIN')
    dsn = world.dsn["ie"].replace("postgres@", f"{role}@", 1)
    name_store(dsn, "region ie")
    with pytest.raises(psycopg.Error) as e, connect(dsn) as c:
        c.execute("SELECT * FROM videos")
    said = describe(e.value)
    assert "region ie" in said and "permission denied for table videos" in said and "42501" in said
