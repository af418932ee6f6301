"""A cutover killed after its decision, with no watchdog beside it (its machine lost too):
`status` shows the shard unfinished, and `migrator recover` (or any next command) finishes it."""

from __future__ import annotations

import json
import signal
import time

import psycopg
import pytest

from migrator.demo.relay import Relay
from tests.conftest import World
from tests.helpers import paused, verified_region

pytestmark = pytest.mark.integration


def test_status_shows_an_unfinished_cutover_and_recover_finishes_it(world: World):
    world.write_spec(sharding={"shards_per_region": 1})
    uid = verified_region(world, "ie")
    proc = paused(world, "held", "cutover", "--region", "ie", env={"MIGRATOR_WATCHDOG": "off"})
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    with pytest.raises(psycopg.Error) as e:  # held at the source, the directory not flipped: locked out
        world.rows("us", "UPDATE users SET email = email WHERE user_id = %s RETURNING 1", (uid,))
    assert e.value.sqlstate == "RMF01"
    res = world.migrator("status", "--region", "ie", "--json")
    (row,) = json.loads(res.stdout)["shards"]
    assert row["state"] == "verified" and "complete the cutover's flip" in row["unfinished"]
    res = world.migrator("recover", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["resolved"] == {row["shard_id"]: ["cutover completed"]}
    assert world.ctl("SELECT home FROM migrator.directory WHERE user_key = %s", (str(uid),)) == [("ie",)]
    world.rows("ie", "UPDATE users SET email = email WHERE user_id = %s RETURNING 1", (uid,))  # writable at home
    (row,) = json.loads(world.migrator("status", "--region", "ie", "--json").stdout)["shards"]
    assert row["state"] == "cut_over" and "unfinished" not in row
    assert world.ctl("SELECT count(*) FROM migrator.audit WHERE detail->>'by' = 'recovery'")[0][0] == 1


@pytest.mark.parametrize("verb, point", [("cutover", "held"), ("rollback", "rollback held")])
def test_a_worker_lost_behind_a_frozen_link_holds_no_one_past_the_dead_session_bound(world: World, verb, point):
    """The worker's link to the control database freezes (nothing passes, nothing closes:
    a lost host, a cut cable) just after its decision, and the worker dies with no watchdog.
    `recover` exits 1 while the lost session still holds the shard, and within
    changes.dead_session_s finishes it: every user writable at exactly one home."""
    world.write_spec(sharding={"shards_per_region": 1}, changes={"dead_session_s": 8})
    uid = verified_region(world, "ie")
    if verb == "rollback":
        assert world.migrator("cutover", "--region", "ie").returncode == 0
    direct = world.spec["control"]["dsn"]
    host_port = direct.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    with Relay((host, int(port)), rtt_ms=2) as relay:
        world.write_spec(control={"dsn": direct.replace(host_port, f"127.0.0.1:{relay.port}")})
        args = ["--region", "ie"] + (["--reason", "the frozen link's probe"] if verb == "rollback" else [])
        proc = paused(world, point, verb, *args, seconds=600, env={"MIGRATOR_WATCHDOG": "off"})
        world.write_spec(control={"dsn": direct})  # recover reaches the control database directly
        relay.freeze()
        frozen_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = world.migrator("recover", "--json")
        first_s = time.monotonic() - frozen_at
        res = first
        while res.returncode != 0:
            assert time.monotonic() - frozen_at < 8 + 45, res.stdout + res.stderr
            time.sleep(1)
            res = world.migrator("recover", "--json")
    # the lost session's last keep-alive came at most 2 s before the freeze: it holds the
    # shard for 6 s more at least, and recover says so with exit 1
    if first_s < 5:
        assert first.returncode == 1 and json.loads(first.stdout)["unfinished"], (first_s, first.stdout)
    assert json.loads(res.stdout)["ok"] is True
    home = "ie" if verb == "cutover" else "us"
    away = "us" if home == "ie" else "ie"
    assert world.ctl("SELECT home FROM migrator.directory WHERE user_key = %s", (str(uid),)) == [(home,)]
    world.rows(home, "UPDATE users SET email = email WHERE user_id = %s RETURNING 1", (uid,))  # writable at home
    with pytest.raises(psycopg.Error) as e:  # and refused at the other
        world.rows(away, "UPDATE users SET email = email WHERE user_id = %s RETURNING 1", (uid,))
    assert e.value.sqlstate == "RMF01"
