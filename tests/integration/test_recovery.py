"""A cutover killed after its decision, with no watchdog beside it (its machine lost too):
`status` shows the shard unfinished, and `migrator recover` (or any next command) finishes it."""

from __future__ import annotations

import json
import signal
import time

import psycopg
import pytest

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
