"""Purge: the source copy of cut-over shards retired, rows deleted or pseudonymised by the
spec, checked against the tests' own SQL and HMACs."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime

import psycopg
import pytest

from migrator.demo.workload import Writer
from tests.conftest import DEMO_OWNED, World
from tests.helpers import inet_pseudonym, movers, paused, text_pseudonym, writes_at_home

pytestmark = pytest.mark.integration

KEYS = {"ie": "ie-test-key-0123456789abcdef", "no": "no-test-key-0123456789abcdef"}
PURGE = {
    "after": "0s",
    "tables": {
        "users": {"pseudonymise": ["email", "display_name"]},
        "login_events": {"pseudonymise": ["ip"]},
        "devices": "delete",
    },
    "keys": {"ie": {"env": "TEST_PSEUDONYM_KEY_IE"}, "no": {"env": "TEST_PSEUDONYM_KEY_NO"}},
}


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("TEST_PSEUDONYM_KEY_IE", KEYS["ie"])
    monkeypatch.setenv("TEST_PSEUDONYM_KEY_NO", KEYS["no"])


def _text(key: str, v: str | None) -> str | None:
    return text_pseudonym(key.encode(), v)


def _inet(key: str, v: str | None) -> str | None:
    return inet_pseudonym(key.encode(), v)


def _moved(world: World) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for region, key in world.ctl(
        "SELECT s.region, su.user_key FROM migrator.shard_user su JOIN migrator.shard s USING (shard_id)"
    ):
        out.setdefault(region, []).append(int(key))
    return out


def _snapshot(world: World, region: str, users: list[int]) -> dict[str, list[tuple]]:
    return {t: world.rows(region, q, (users,)) for t, q in DEMO_OWNED.items()}


def _cut_over(world: World) -> dict[str, list[int]]:
    assert world.migrator("run").returncode == 0
    return _moved(world)


def test_purge_retires_the_source_copy_by_the_spec(world: World, keys):
    world.write_spec(purge=PURGE)
    moved = _cut_over(world)
    before = {r: _snapshot(world, "us", u) for r, u in moved.items()}
    res = world.migrator("purge", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    would = json.loads(res.stdout)["shards"]
    assert would and all(s["would_purge"]["tables"]["devices"]["action"] == "delete" for s in would)
    assert world.rows("us", "SELECT count(*) FROM devices WHERE user_id = ANY(%s)", (moved["ie"],))[0][0] > 0
    # without --json: a table, a row per shard and table with what would go
    res = world.migrator("purge", "--dry-run")
    assert res.returncode == 0, res.stderr
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in res.stdout.splitlines() if line.count("│") == 6]
    for s in would:
        users = [
            int(k)
            for (k,) in world.ctl("SELECT user_key FROM migrator.shard_user WHERE shard_id = %s", (s["shard_id"],))
        ]
        (devices,) = world.rows("us", "SELECT count(*) FROM devices WHERE user_id = ANY(%s)", (users,))[0]
        assert [s["shard_id"], "devices", "delete", str(devices), ""] in cells, res.stdout
        assert [s["shard_id"], "users", "pseudonymise", str(len(users)), "email, display_name"] in cells
    assert "nothing was written" in res.stdout

    res = world.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert {s["state"] for s in doc["shards"]} == {"purged"}
    receipts = [s["phases"]["purge"]["purged"]["tables"] for s in doc["shards"]]
    assert sum(r["devices"]["rows_deleted"] for r in receipts) > 0
    assert sum(r["users"]["rows_pseudonymised"] for r in receipts) == sum(len(u) for u in moved.values())
    for text in (res.stdout, res.stderr):
        assert KEYS["ie"] not in text and KEYS["no"] not in text

    for region, users in moved.items():
        old = before[region]
        # the destination still holds exactly what the source held
        assert _snapshot(world, region, users) == old
        # deleted tables: nothing left at the source (comments and videos by the default, devices by name)
        for t in ("devices", "videos", "comments"):
            assert world.rows("us", DEMO_OWNED[t], (users,)) == [], t
        # pseudonymised: every original value replaced by its keyed pseudonym, other columns unchanged
        key = KEYS[region]
        cols = [
            c
            for (c,) in world.rows(
                "us",
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'users' ORDER BY ordinal_position",
            )
        ]
        now = world.rows("us", DEMO_OWNED["users"], (users,))
        assert len(now) == len(old["users"])
        for o, n in zip(old["users"], now):
            o, n = dict(zip(cols, o)), dict(zip(cols, n))
            assert n["email"] == _text(key, o["email"]) and n["display_name"] == _text(key, o["display_name"])
            assert {k: v for k, v in n.items() if k not in ("email", "display_name")} == {
                k: v for k, v in o.items() if k not in ("email", "display_name")
            }
        ips = world.rows("us", "SELECT host(ip) FROM login_events WHERE user_id = ANY(%s) ORDER BY 1", (users,))
        want = sorted(
            (_inet(key, ip),)
            for (ip,) in world.rows(region, "SELECT host(ip) FROM login_events WHERE user_id = ANY(%s)", (users,))
        )
        assert sorted(ips, key=lambda r: r[0] or "") == sorted(want, key=lambda r: r[0] or "")

    # the point of no return: rollback refused, naming the purge's time
    sid = doc["shards"][0]["shard_id"]
    res = world.migrator("rollback", "--shard", sid, "--reason", "too late")
    assert res.returncode != 0 and "purge started" in res.stdout + res.stderr, res.stderr
    # the source refuses to take a purged user's rows back
    uid = moved["ie"][0]
    with pytest.raises(psycopg.Error) as e:
        world.rows(
            "us", "INSERT INTO devices (user_id, device_no, phone) VALUES (%s, 999999, '+1555') RETURNING 1", (uid,)
        )
    assert e.value.sqlstate == "RMF01"
    # a second purge finds nothing to do; rerunning the migrated wave changes nothing and is green
    again = world.migrator("purge", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["shards"] == []
    rerun = world.migrator("run", "--json")
    assert rerun.returncode == 0, rerun.stdout[-2000:]
    assert {s["state"] for s in json.loads(rerun.stdout)["shards"]} == {"purged"}


def test_a_purge_killed_midway_resumes_and_each_batch_is_whole(world: World, keys):
    world.write_spec(purge=PURGE, sharding={"shards_per_region": 1})
    moved = _cut_over(world)
    proc = paused(world, "purged batch", "purge", "--region", "ie", seconds=60)
    proc.kill()
    proc.wait()
    sid = world.ctl("SELECT shard_id FROM migrator.shard WHERE region = 'ie'")[0][0]
    assert world.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("purging",)]
    done = [b for (b,) in world.rows("us", "SELECT batch_no FROM migrator.purge_ledger WHERE shard_id = %s", (sid,))]
    batches = world.ctl("SELECT batches FROM migrator.shard WHERE shard_id = %s", (sid,))[0][0]
    # each of the copy's two lanes stops at its first committed batch, or was still in one
    # (a try retried from its checkpoint under load may have committed one more first)
    assert 1 <= len(done) < batches
    purged_users = [
        int(k)
        for (k,) in world.ctl(
            "SELECT user_key FROM migrator.shard_user WHERE shard_id = %s AND batch_no = ANY(%s)", (sid, done)
        )
    ]
    rest = sorted(set(moved["ie"]) - set(purged_users))
    assert world.rows("us", "SELECT count(*) FROM devices WHERE user_id = ANY(%s)", (purged_users,)) == [(0,)]
    assert world.rows("us", "SELECT count(*) FROM users WHERE user_id = ANY(%s) AND email LIKE 'pz1_%%'", (rest,)) == [
        (0,)
    ]
    res = world.migrator("purge", "--region", "ie", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert world.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("purged",)]
    assert world.rows(
        "us", "SELECT count(*) FROM users WHERE user_id = ANY(%s) AND email NOT LIKE 'pz1_%%'", (moved["ie"],)
    ) == [(0,)]
    # pseudonymised once, not twice: the resumed run left the first batch alone
    key = KEYS["ie"]
    emails = {
        u: e for u, e in world.rows("ie", "SELECT user_id, email FROM users WHERE user_id = ANY(%s)", (purged_users,))
    }
    assert dict(world.rows("us", "SELECT user_id, email FROM users WHERE user_id = ANY(%s)", (purged_users,))) == {
        u: _text(key, e) for u, e in emails.items()
    }


def test_a_purge_refuses_before_touching_anything(world: World, keys, monkeypatch):
    world.write_spec(purge={**PURGE, "after": "7d"})
    moved = _cut_over(world)
    devices = world.rows("us", "SELECT count(*) FROM devices")[0][0]
    # inside the retention: named, nothing purged; unnamed, nothing is due
    sid = world.ctl("SELECT shard_id FROM migrator.shard WHERE region = 'ie' ORDER BY 1 LIMIT 1")[0][0]
    res = world.migrator("purge", "--shard", sid)
    assert res.returncode == 1 and "retention" in res.stderr + res.stdout
    res = world.migrator("purge", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["shards"] == []
    # no key where the worker runs
    world.write_spec(purge=PURGE)
    monkeypatch.delenv("TEST_PSEUDONYM_KEY_IE")
    res = world.migrator("purge", "--shard", sid)
    assert res.returncode == 1 and "TEST_PSEUDONYM_KEY_IE" in res.stdout + res.stderr
    monkeypatch.setenv("TEST_PSEUDONYM_KEY_IE", KEYS["ie"])
    # the frozen source copy changed behind the fence (a session passing the guard as the
    # tool's own does): refused, naming the shard and the table, never the value
    uid = moved["ie"][0]
    shard_of = world.ctl("SELECT shard_id FROM migrator.shard_user WHERE user_key = %s", (str(uid),))[0][0]
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute("SET LOCAL migrator.apply = 'on'")
        c.execute("UPDATE devices SET phone = '+0000' WHERE user_id = %s", (uid,))
    res = world.migrator("purge", "--shard", shard_of, "--json")
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert shard_of in out and "devices" in out and "+0000" not in out
    assert world.rows("us", "SELECT count(*) FROM devices")[0][0] == devices
    assert world.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (shard_of,)) == [("cut_over",)]


def test_a_purge_runs_after_the_application_wrote_at_the_new_home(world: World, keys):
    """From the flip on, the destination is the application's: updates, inserts and deletes
    there after cutover, and a schema change made everywhere, do not hold the purge back;
    the source copy goes by the policy and the new home keeps every write."""
    world.write_spec(purge=PURGE)
    moved = _cut_over(world)
    for region, users in moved.items():
        some = users[:5]
        world.rows(
            region, "UPDATE users SET display_name = 'renamed at home' WHERE user_id = ANY(%s) RETURNING 1", (some,)
        )
        world.rows(
            region,
            "INSERT INTO login_events (event_id, user_id, ip, at, success) "
            "SELECT 900000000 + user_id, user_id, '10.9.8.7', now(), true FROM users "
            "WHERE user_id = ANY(%s) RETURNING 1",
            (some,),
        )
        world.rows(region, "DELETE FROM devices WHERE user_id = %s RETURNING 1", (users[-1],))
    # and a column added everywhere since: the source copy is still the one the cutover froze
    for dsn in world.dsn.values():
        with psycopg.connect(dsn) as c:
            c.execute("ALTER TABLE videos ADD COLUMN rating int DEFAULT 3")
    after = {r: _snapshot(world, r, u) for r, u in moved.items()}
    res = world.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert {s for (s,) in world.ctl("SELECT DISTINCT state FROM migrator.shard")} == {"purged"}
    for region, users in moved.items():
        assert _snapshot(world, region, users) == after[region]  # every write at the new home kept
        assert world.rows("us", DEMO_OWNED["devices"], (users,)) == []
        renamed = world.rows("us", "SELECT count(*) FROM users WHERE display_name = 'renamed at home'")[0][0]
        assert renamed == 0


@pytest.mark.parametrize(
    ("purge", "needle"),
    [
        ({"tables": {"users": "delete", "devices": "keep"}}, "purge.tables.devices"),
        ({"tables": {"users": {"pseudonymise": ["email"]}, "devices": {"pseudonymise": ["user_id"]}}}, "joins on"),
        ({"tables": {"users": {"pseudonymise": ["email"]}, "videos": {"pseudonymise": ["created_at"]}}}, "created_at"),
        ({"after": "soon"}, "purge.after"),
    ],
)
def test_a_purge_section_that_cannot_work_is_refused(world: World, purge, needle):
    world.write_spec(purge=purge)
    res = world.migrator("purge", "--dry-run")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert needle in res.stderr


def test_a_child_table_is_pseudonymised_through_its_parents(world: World, keys):
    # comments belong to their user through videos: the purge finds them by that path
    world.write_spec(
        purge=dict(PURGE, tables={"videos": "keep", "comments": {"pseudonymise": ["body"]}, "users": "keep"})
    )
    moved = _cut_over(world)
    comments = DEMO_OWNED["comments"]
    everyone = [uid for (uid,) in world.rows("us", "SELECT user_id FROM users")]
    stay = sorted(set(everyone) - {u for us in moved.values() for u in us})
    before = {r: world.rows("us", comments, (u,)) for r, u in moved.items()}
    stayed = world.rows("us", comments, (stay,))
    res = world.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for region, users in moved.items():
        now = world.rows("us", comments, (users,))
        assert len(now) == len(before[region]) and any(o[3] is None for o in before[region])
        for o, n in zip(before[region], now):
            # comment_id, video_id, author_id, body, created_at: only the body changed
            assert n[3] == _text(KEYS[region], o[3]) and n[:3] + n[4:] == o[:3] + o[4:]
    assert world.rows("us", comments, (stay,)) == stayed  # the users who stay keep their comments as they were


def test_the_source_down_mid_purge_is_ridden_out(world: World, keys):
    # the source (and the control database on the same server) stops between two batches
    # for two seconds; the purge waits for it and finishes, every batch whole
    world.write_spec(purge=PURGE, sharding={"shards_per_region": 1}, retry={"outage_s": 30})
    moved = _cut_over(world)
    proc = paused(world, "purged batch", "purge", "--region", "ie", seconds=3, out=subprocess.PIPE)
    server = world.cluster["us"]
    server.stop("immediate")
    time.sleep(2)
    server.start()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    sid = world.ctl("SELECT shard_id FROM migrator.shard WHERE region = 'ie'")[0][0]
    assert world.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("purged",)]
    batches = world.ctl("SELECT batches FROM migrator.shard WHERE shard_id = %s", (sid,))[0][0]
    ledger = world.rows("us", "SELECT batch_no FROM migrator.purge_ledger WHERE shard_id = %s ORDER BY 1", (sid,))
    assert [b for (b,) in ledger] == list(range(batches))
    users = moved["ie"]
    assert world.rows("us", "SELECT count(*) FROM devices WHERE user_id = ANY(%s)", (users,)) == [(0,)]
    assert world.rows(
        "us", "SELECT count(*) FROM users WHERE user_id = ANY(%s) AND email NOT LIKE 'pz1_%%'", (users,)
    ) == [(0,)]
    assert world.rows("us", "SELECT count(*) FROM users WHERE user_id = ANY(%s)", (users,)) == [(len(users),)]
    assert KEYS["ie"] not in out


def test_the_migrators_own_writes_do_not_call_the_guards(world: World):
    """The guards' trigger condition lets the migrator's sessions (copy apply, rollback,
    purge) past without a PL/pgSQL call per row; the application's writes still run them."""
    moved = _cut_over(world)
    mover = moved["ie"][0]
    (stayer,) = world.rows("us", "SELECT min(user_id) FROM users WHERE country_code = 'US'")[0]

    def guard_calls(user: int, apply: bool) -> tuple[int, int]:
        with psycopg.connect(world.dsn["us"]) as c:
            c.execute("SET LOCAL track_functions = 'pl'")
            if apply:
                c.execute("SET LOCAL migrator.apply = 'on'")
            n = c.execute("UPDATE login_events SET success = NOT success WHERE user_id = %s", (user,)).rowcount
            (calls,) = c.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions "
                "WHERE schemaname = 'migrator' AND funcname LIKE 'guard%%'"
            ).fetchone()
            c.rollback()
        return n, calls

    n, calls = guard_calls(mover, apply=True)
    assert n > 0 and calls == 0
    n, calls = guard_calls(stayer, apply=False)
    assert n > 0 and calls == n


def test_a_purge_with_the_application_writing_at_the_new_homes(world: World, keys):
    """The application writes through the migration, on at the new homes, and through the
    purge: every shard ends purged, the source copy is gone or pseudonymised as the policy
    says, and no acknowledged write is lost."""
    world.write_spec(purge=PURGE)
    writer = Writer(world.dsn, world.control, movers(world)).start()
    try:
        res = world.migrator("run", "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        time.sleep(2)  # writes at the new homes after cutover
        res = world.migrator("purge", "--json")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        time.sleep(1)
    finally:
        acked = writer.stop()
    writes_at_home(world, writer, acked, at_least=100)
    assert {s for (s,) in world.ctl("SELECT DISTINCT state FROM migrator.shard")} == {"purged"}
    moved = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.shard_user")]
    for t in ("videos", "comments", "devices"):
        assert world.rows("us", DEMO_OWNED[t], (moved,)) == [], t
    emails = [e for (e,) in world.rows("us", "SELECT email FROM users WHERE user_id = ANY(%s)", (moved,))]
    assert len(emails) == len(moved) and all(e.startswith("pz1_") for e in emails)


def test_with_nothing_due_the_purge_dag_says_when_the_next_shard_is(world: World, keys):
    """The purge DAG's report with nothing due: the shard whose retention ends first, and
    when (the time it entered cut_over plus `purge.after`, added up here in SQL)."""
    from migrator.airflow import tasks

    world.write_spec(sharding={"shards_per_region": 1}, purge={**PURGE, "after": "7d"})
    spec = tasks.load(str(world.spec_path))
    said = tasks.purge_verdict(spec, [], dry_run=False)
    assert said["shards"] == 0 and "no cut-over shard waits" in said["said"] and "next_due" not in said
    assert world.migrator("run", "--region", "ie").returncode == 0
    assert tasks.purge_select(spec, "purge", None, None, None) == []  # not due for a week
    said = tasks.purge_verdict(spec, [], dry_run=False)
    ((due,),) = world.ctl("SELECT state_since + interval '7 days' FROM migrator.shard WHERE region = 'ie'")
    assert datetime.fromisoformat(said["next_due"]) == due and "ie-00" in said["said"], (said, due)
