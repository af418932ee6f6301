"""The copy and the verify's reads at the source hold back while the source is busy, and
under their rate ceiling; each pause is in the shard's audit trail with its reason."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from migrator.demo import seed
from migrator.demo.embedded import LocalPostgres
from tests.conftest import DEMO_OWNED, World
from tests.helpers import start

pytestmark = pytest.mark.integration


def _throttled(world: World, phase: str = "copy") -> list[dict]:
    return [
        d
        for (d,) in world.ctl("SELECT detail FROM migrator.audit WHERE detail->>'event' = %s", (f"{phase} throttled",))
    ]


def _busy_source(world: World, seconds: float) -> tuple[threading.Event, list[threading.Thread]]:
    """Two other clients keep the source busy until the tool has been connected to it for
    `seconds` (counted from its first session, so a slow start of the command does not use
    up the busy spell), or for a minute at most."""
    stop = threading.Event()

    def busy():
        with psycopg.connect(world.dsn["us"], autocommit=True) as c:
            while not stop.is_set():
                c.execute("SELECT pg_sleep(0.5)")

    def watch():
        deadline = time.monotonic() + 60
        with psycopg.connect(world.dsn["us"], autocommit=True) as c:
            while not stop.is_set() and time.monotonic() < deadline:
                seen = c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'residency-migrator%%'"
                ).fetchone()
                if seen and seen[0]:
                    stop.wait(seconds)
                    break
                time.sleep(0.05)
        stop.set()

    load = [threading.Thread(target=busy) for _ in range(2)]
    for t in load:
        t.start()
    time.sleep(0.5)
    load.append(threading.Thread(target=watch))
    load[-1].start()
    return stop, load


def test_the_copy_waits_while_the_source_is_busy_and_then_finishes(world: World):
    world.write_spec(copy={"batch_users": 50, "throttle": {"max_active": 1, "check_every_s": 0.2}})
    assert world.migrator("plan", "--region", "ie").returncode == 0
    stop, load = _busy_source(world, 3.0)
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
    for phase in ("copy", "verify"):
        paused = _throttled(world, phase)
        assert paused and all("rate is at its ceiling (400 rows/s)" in " ".join(d["reasons"]) for d in paused), phase
    states = {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'")}
    assert states == {"cut_over"}


def test_the_verify_waits_while_the_source_is_busy_outside_any_transaction(world: World):
    world.write_spec(copy={"batch_users": 50})
    assert world.migrator("plan", "--region", "ie").returncode == 0
    assert world.migrator("copy", "--region", "ie").returncode == 0
    world.write_spec(copy={"batch_users": 50, "throttle": {"max_active": 1, "check_every_s": 0.2}})
    # the migrator's sessions at the source that sat in an open transaction for a while
    held: list[tuple] = []
    watching = threading.Event()

    def watch():
        with psycopg.connect(world.dsn["us"], autocommit=True) as c:
            while not watching.is_set():
                held.extend(
                    c.execute(
                        "SELECT pid, state FROM pg_stat_activity WHERE application_name LIKE 'residency-migrator%%' "
                        "AND state LIKE 'idle in transaction%%' AND clock_timestamp() - state_change > interval '0.5 s'"
                    ).fetchall()
                )
                time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    stop, load = _busy_source(world, 3.0)
    try:
        res = world.migrator("verify", "--region", "ie")
    finally:
        stop.set()
        watching.set()
        for t in [*load, watcher]:
            t.join()
    assert res.returncode == 0, res.stderr[-2000:]
    paused = _throttled(world, "verify")
    assert paused and any("other queries running at the source" in r for d in paused for r in d["reasons"])
    assert sum(d["waited_s"] for d in paused) >= 1.0  # the busy clients ran about 3 s
    assert held == []  # the pauses were spent outside any transaction at the source
    assert {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'ie'")} == {"verified"}
    status = json.loads(world.migrator("status", "--region", "ie", "--json").stdout)
    assert sum(s.get("throttled_s", 0) for s in status["shards"]) >= 1.0  # the verify's pauses, in status


def test_bad_throttle_settings_are_refused(world: World):
    world.write_spec(copy={"throttle": {"max_rows_per_s": 0}})
    res = world.migrator("plan")
    assert res.returncode == 2 and "max_rows_per_s" in res.stderr


def _own_source_with_standby(world: World, tmp_path):
    """A source server of the test's own (the shared one must not be paused) with the
    demo's 400 users, and a streaming standby of it."""
    primary = LocalPostgres("primary", tmp_path).init().start()
    src = primary.create_database("app")
    with psycopg.connect(src) as c:
        c.execute(seed.schema_sql())
    seed.seed(src, 400)
    return primary, src, primary.standby("standby")


def _lag(dsn: str) -> float:
    """The standby's replay lag in seconds, as this test reads it (0 when it is caught up)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) "
            "WHERE pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()"
        ).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


def test_the_copy_waits_while_a_standby_replays_behind(world: World, tmp_path):
    primary, src, standby = _own_source_with_standby(world, tmp_path)
    try:
        world.write_spec(
            regions=dict(world.spec["regions"], us={"dsn": src}),
            copy={
                "batch_users": 50,
                "throttle": {"standby": {"dsn": standby.dsn("app")}, "max_replay_lag_s": 1, "check_every_s": 0.2},
            },
        )
        assert world.migrator("plan", "--region", "ie").returncode == 0
        touch = "UPDATE users SET display_name = display_name WHERE user_id = (SELECT min(user_id) FROM users)"
        # a write the standby has replayed before its replay is paused: the lag is counted from
        # the last transaction it replayed, and there is none until then
        with psycopg.connect(src, autocommit=True) as c:
            c.execute(touch)
            (written,) = c.execute("SELECT pg_current_wal_lsn()").fetchone()
        deadline = time.monotonic() + 30
        with psycopg.connect(standby.dsn("app"), autocommit=True) as c:
            while not c.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (written,)).fetchone()[0]:
                assert time.monotonic() < deadline, "the standby did not replay the write"
                time.sleep(0.1)
            c.execute("SELECT pg_wal_replay_pause()")
        with psycopg.connect(src, autocommit=True) as c:  # the application writes on
            c.execute(touch)
        while _lag(standby.dsn("app")) <= 1.5:
            assert time.monotonic() < deadline, "the paused standby did not fall behind"
            time.sleep(0.2)

        def resume():
            # 3 s after the copy has begun (its shard copying), not after the command started:
            # a slow start of the command on a loaded machine does not use up the lag
            until = time.monotonic() + 60
            while (
                time.monotonic() < until
                and not world.ctl("SELECT count(*) FROM migrator.shard WHERE region = 'ie' AND state = 'copying'")[0][0]
            ):
                time.sleep(0.05)
            time.sleep(3.0)
            with psycopg.connect(standby.dsn("app"), autocommit=True) as c:
                c.execute("SELECT pg_wal_replay_resume()")

        t0 = time.monotonic()
        timer = threading.Thread(target=resume)
        timer.start()
        res = world.migrator("copy", "--region", "ie")
        timer.join()
        assert res.returncode == 0, res.stderr[-2000:]
        assert time.monotonic() - t0 >= 3.0  # nothing finished before the standby caught up
        paused = _throttled(world)
        reasons = [r for d in paused for r in d["reasons"]]
        assert any("the standby of region us" in r and "behind the source (max_replay_lag_s 1)" in r for r in reasons)
        assert sum(d["waited_s"] for d in paused) > 0  # how long depends on when the command got going
        assert all(len(d["reasons"]) == 1 for d in paused)  # one cause, named once per pause
        assert world.migrator("run", "--region", "ie").returncode == 0
        ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie'")]
        assert ids
        with psycopg.connect(src) as s, psycopg.connect(world.dsn["ie"]) as d:
            for table, q in DEMO_OWNED.items():
                assert s.execute(q, (ids,)).fetchall() == d.execute(q, (ids,)).fetchall(), table

        # a standby that is not one (the source itself) is a spec problem, named, exit 2
        world.write_spec(
            copy={"batch_users": 50, "throttle": {"standby": {"dsn": src}, "max_replay_lag_s": 1}},
        )
        res = world.migrator("run", "--region", "no")
        assert res.returncode == 2 and "is not in recovery, so it is not a standby" in res.stderr, res.stderr[-2000:]
        assert "postgres@" not in res.stderr
    finally:
        standby.stop("immediate")
        primary.stop("immediate")


def test_a_standby_without_its_lag_setting_is_refused(world: World):
    world.write_spec(copy={"throttle": {"standby": {"dsn": world.dsn["us"]}}})
    res = world.migrator("plan")
    assert res.returncode == 2 and "standby and max_replay_lag_s go together" in res.stderr


def test_a_stopped_standby_holds_the_copy_until_it_is_back(world: World, tmp_path):
    """The standby is stopped before the copy: its lag cannot be seen, so the copy waits
    (saying why), nothing is copied meanwhile; the standby comes back and the copy ends
    with the destination equal to the source."""
    primary, src, standby = _own_source_with_standby(world, tmp_path)
    try:
        world.write_spec(
            regions=dict(world.spec["regions"], us={"dsn": src}),
            retry={"attempts": 2, "initial_wait_s": 0.1, "max_wait_s": 0.2},
            copy={
                "batch_users": 50,
                "throttle": {"standby": {"dsn": standby.dsn("app")}, "max_replay_lag_s": 5, "check_every_s": 0.2},
            },
        )
        assert world.migrator("plan", "--region", "ie").returncode == 0
        standby.stop("immediate")
        copy = start(world, "copy", "--region", "ie")
        # the standby comes back a few seconds after the copy has begun (however long the
        # command took to get going on a loaded machine), with nothing copied meanwhile
        t0 = time.monotonic()
        while world.ctl("SELECT count(*) FROM migrator.shard WHERE region = 'ie' AND state = 'copying'") == [(0,)]:
            assert copy.poll() is None and time.monotonic() - t0 < 120, "the copy never began"
            time.sleep(0.1)
        time.sleep(3.0)
        assert world.ctl("SELECT count(*) FROM migrator.checkpoint") == [(0,)]
        standby.start()
        assert copy.wait(300) == 0
        paused = _throttled(world)
        reasons = [r for d in paused for r in d["reasons"]]
        assert any("the standby of region us" in r and "replay lag is unknown" in r for r in reasons), reasons
        assert all("postgres@" not in r for r in reasons)  # named by address, never by DSN
        assert sum(d["waited_s"] for d in paused) > 0  # how long depends on when the command got going
        assert world.migrator("run", "--region", "ie").returncode == 0
        ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie'")]
        assert ids
        with psycopg.connect(src) as s, psycopg.connect(world.dsn["ie"]) as d:
            for table, q in DEMO_OWNED.items():
                assert s.execute(q, (ids,)).fetchall() == d.execute(q, (ids,)).fetchall(), table
    finally:
        standby.stop("immediate")
        primary.stop("immediate")
