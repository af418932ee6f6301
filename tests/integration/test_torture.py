"""Kills at random instants throughout cutover and rollback, with the application writing.

After every kill, with no command typed, each of the shard's users must be able to write at
their directory home within the stated worst case, and no write may be accepted at a home
the directory does not name; a rerun then finishes the phase, and at the end every
acknowledged write is at its user's home exactly once. Trials: MIGRATOR_TORTURE_TRIALS
(each trial kills one cutover and one rollback); run alone with 50 or more."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import psycopg
import pytest

from migrator.demo.workload import Writer, check
from tests.conftest import DEMO_OWNED, World
from tests.helpers import movers, reached, start

pytestmark = [pytest.mark.integration, pytest.mark.torture]

TRIALS = int(os.environ.get("MIGRATOR_TORTURE_TRIALS", "3"))
WINDOW_S = 2.0
RECOVERY_S = 5.0  # the README's bound on the watchdog's reaction to a dead worker
WORST_S = WINDOW_S + 1.0 + RECOVERY_S
CUTOVER_POINTS = ["staged", "fenced", "held"]
ROLLBACK_POINTS = ["rollback held"]


def _probe(conn: psycopg.Connection, uid: int) -> str:
    """'ok' if the user's row takes a write here, 'fenced' if the database refuses it,
    'absent' if there is no row; the write is rolled back either way."""
    try:
        with conn.transaction(force_rollback=True):
            n = conn.execute("UPDATE users SET display_name = display_name WHERE user_id = %s", (uid,)).rowcount
        return "ok" if n else "absent"
    except psycopg.Error as e:
        if e.sqlstate == "RMF01":
            return "fenced"
        raise


def _homes(w: World, wave: str) -> dict[int, str]:
    return {
        int(k): h
        for k, h in w.ctl(
            "SELECT d.user_key, d.home FROM migrator.directory d JOIN migrator.shard_user su USING (user_key) "
            "JOIN migrator.shard s USING (shard_id) WHERE s.wave = %s AND s.region = 'ie'",
            (wave,),
        )
    }


def _settles(w: World, wave: str, killed_at: float, rollback: bool) -> float:
    """Seconds after the kill until every user of the wave writes at its home; asserts on
    every look that no home the directory does not name takes a write."""
    conns = {r: psycopg.connect(w.dsn[r], autocommit=True) for r in ("us", "ie")}
    try:
        while True:
            homes = _homes(w, wave)
            assert homes
            stuck = []
            for uid, home in homes.items():
                away = "ie" if home == "us" else "us"
                if away == "us" or rollback:  # before a first cutover the destination is not fenced
                    # A home moves one way within a trial, so a home read again after the probe
                    # that is still the same was the home when the probe wrote.
                    if _probe(conns[away], uid) == "ok":
                        assert _homes(w, wave)[uid] != home, f"user {uid} homed {home} took a write at {away}"
                if _probe(conns[home], uid) != "ok":
                    stuck.append(uid)
            took = time.monotonic() - killed_at
            if not stuck:
                return took
            assert took < WORST_S, f"{len(stuck)} user(s) could not write at their home {took:.1f} s after the kill"
            time.sleep(0.1)
    finally:
        for c in conns.values():
            c.close()


def _killed(w: World, rnd: random.Random, args: list[str], points: list[str]) -> subprocess.Popen:
    """Start the command and SIGKILL it: at a random instant, or while paused at a point."""
    point = rnd.choice(points) if rnd.random() < 0.5 else None
    env = {"MIGRATOR_PAUSE_AT": point, "MIGRATOR_PAUSE_S": "30"} if point else {}
    proc = start(w, *args, env=env)
    if point:
        t0 = time.monotonic()
        while not reached(w, point):
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                break  # ended before the point (e.g. nothing to do): the kill below is a no-op
            time.sleep(0.02)
        with psycopg.connect(w.control) as c:  # the next trial waits for its own pause
            c.execute("DELETE FROM migrator.audit WHERE detail->>'event' = %s", (f"paused at {point}",))
    else:
        time.sleep(rnd.uniform(0.2, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def test_kills_throughout_cutover_and_rollback(world: World):
    world.write_spec(sharding={"shards_per_region": 1}, changes={"fence_window_s": WINDOW_S})
    rnd = random.Random(int(os.environ.get("MIGRATOR_TORTURE_SEED", "20261201")))
    writer = Writer(world.dsn, world.control, movers(world)).start()
    try:
        settled = _trials(world, rnd)
    finally:
        acked = writer.stop()
    assert not writer.errors, writer.errors[:5]
    assert acked.ops > 0
    check(world.dsn, world.control, acked)
    print(
        f"torture: {TRIALS} trial(s); seconds from kill to every user writable at home: "
        f"max {max(settled):.2f}, median {sorted(settled)[len(settled) // 2]:.2f}"
    )


def _trials(world: World, rnd: random.Random) -> list[float]:
    settled: list[float] = []
    for i in range(TRIALS):
        wave = f"t{i}"
        for cmd in ("plan", "copy", "verify"):
            res = world.migrator(cmd, "--wave", wave, "--region", "ie")
            assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
        _killed(world, rnd, ["cutover", "--wave", wave, "--region", "ie"], CUTOVER_POINTS)
        settled.append(_settles(world, wave, time.monotonic(), rollback=False))
        res = world.migrator("cutover", "--wave", wave, "--region", "ie", "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert set(_homes(world, wave).values()) == {"ie"}
        time.sleep(0.5)  # the writer writes at the new home
        _killed(world, rnd, ["rollback", "--wave", wave, "--region", "ie", "--reason", "torture"], ROLLBACK_POINTS)
        settled.append(_settles(world, wave, time.monotonic(), rollback=True))
        res = world.migrator("rollback", "--wave", wave, "--region", "ie", "--reason", "torture", "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert set(_homes(world, wave).values()) == {"us"}
        for t in DEMO_OWNED:  # everything is back at the source; nothing of the shard stays at ie
            assert world.rows("ie", f"SELECT count(*) FROM {t}")[0][0] == 0, t
        res = world.migrator("release", "--wave", wave, "--shard", "ie-00", "--reason", "next trial")
        assert res.returncode == 0, res.stderr[-2000:]
    return settled
