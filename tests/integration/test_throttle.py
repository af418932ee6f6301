"""The copy holds back while the source is busy, and under its rate ceiling; each pause is
in the shard's audit trail with its reason."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from tests.conftest import DEMO_OWNED, World

pytestmark = pytest.mark.integration


def _throttled(world: World) -> list[dict]:
    return [d for (d,) in world.ctl("SELECT detail FROM migrator.audit WHERE detail->>'event' = 'copy throttled'")]


def test_the_copy_waits_while_the_source_is_busy_and_then_finishes(world: World):
    world.write_spec(copy={"batch_users": 50, "throttle": {"max_active": 1, "check_every_s": 0.2}})
    assert world.migrator("plan", "--region", "ie").returncode == 0
    # two other clients keep the source busy for a few seconds
    stop = threading.Event()

    def busy():
        with psycopg.connect(world.dsn["us"], autocommit=True) as c:
            while not stop.is_set():
                c.execute("SELECT pg_sleep(0.5)")

    load = [threading.Thread(target=busy) for _ in range(2)]
    for t in load:
        t.start()
    time.sleep(0.5)
    release = threading.Timer(3.0, stop.set)
    release.start()
    try:
        res = world.migrator("copy", "--region", "ie")
    finally:
        stop.set()
        for t in load:
            t.join()
    assert res.returncode == 0, res.stderr[-2000:]
    paused = _throttled(world)
    assert paused and any("other queries running at the source" in r for d in paused for r in d["reasons"])
    assert sum(d["waited_s"] for d in paused) > 0
    status = json.loads(world.migrator("status", "--region", "ie", "--json").stdout)
    assert sum(s.get("throttled_s", 0) for s in status["shards"]) > 0  # the pause, visible in status
    assert world.migrator("run", "--region", "ie").returncode == 0
    ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie'")]
    for table, q in DEMO_OWNED.items():
        assert world.rows("us", q, (ids,)) == world.rows("ie", q, (ids,)), table


def test_the_copy_keeps_under_its_rate_ceiling(world: World):
    world.write_spec(copy={"batch_users": 5, "throttle": {"max_rows_per_s": 400}})
    res = world.migrator("run", "--region", "no")
    assert res.returncode == 0, res.stderr[-2000:]
    paused = _throttled(world)
    assert paused and all("rate is at its ceiling (400 rows/s)" in " ".join(d["reasons"]) for d in paused)
    states = {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'")}
    assert states == {"cut_over"}


def test_bad_throttle_settings_are_refused(world: World):
    world.write_spec(copy={"throttle": {"max_rows_per_s": 0}})
    res = world.migrator("plan")
    assert res.returncode == 2 and "max_rows_per_s" in res.stderr
