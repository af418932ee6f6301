"""Kills at random instants throughout cutover and rollback, with the application writing.

After every kill, with no command typed, each of the shard's users must be able to write at
their directory home within the stated worst case, and no write may be accepted at a home
the directory does not name; a rerun then finishes the phase, and at the end every
acknowledged write is at its user's home exactly once. Trials: MIGRATOR_TORTURE_TRIALS
(each trial kills one cutover and one rollback); run alone with 50 or more. The same
with Ireland across the 80 ms relay: MIGRATOR_TORTURE_FAR_TRIALS (1 by default)."""

from __future__ import annotations

import os
import random
import time

import pytest

from migrator.demo.workload import Writer, check
from tests.conftest import DEMO_OWNED, World
from tests.helpers import far, homes_of, killed, movers, settles

pytestmark = [pytest.mark.integration, pytest.mark.torture]

TRIALS = int(os.environ.get("MIGRATOR_TORTURE_TRIALS", "3"))
FAR_TRIALS = int(os.environ.get("MIGRATOR_TORTURE_FAR_TRIALS", "1"))  # with Ireland across the 80 ms relay
WINDOW_S = 2.0
RECOVERY_S = 5.0  # the README's bound on the watchdog's reaction to a dead worker
WORST_S = WINDOW_S + 1.0 + RECOVERY_S
CUTOVER_POINTS = ["staged", "fenced", "held"]
ROLLBACK_POINTS = ["rollback held"]


@pytest.mark.parametrize("link", ["loopback", "across the relay"])
def test_kills_throughout_cutover_and_rollback(world: World, link: str):
    world.write_spec(sharding={"shards_per_region": 1}, changes={"fence_window_s": WINDOW_S})
    rnd = random.Random(int(os.environ.get("MIGRATOR_TORTURE_SEED", "20261201")))
    writer = Writer(world.dsn, world.control, movers(world)).start()
    try:
        if link == "loopback":
            settled = _trials(world, rnd, TRIALS)
        else:  # the migrator beside the source, Ireland an ocean away; the writer beside each server
            with far(world, ("ie",)):
                settled = _trials(world, rnd, FAR_TRIALS)
    finally:
        acked = writer.stop()
    assert not writer.errors, writer.errors[:5]
    assert acked.ops > 0
    check(world.dsn, world.control, acked)
    print(
        f"torture ({link}): {len(settled) // 2} trial(s); seconds from kill to every user writable at home: "
        f"max {max(settled):.2f}, median {sorted(settled)[len(settled) // 2]:.2f}"
    )


def _trials(world: World, rnd: random.Random, trials: int) -> list[float]:
    settled: list[float] = []
    for i in range(trials):
        wave = f"t{i}"
        for cmd in ("plan", "copy", "verify"):
            res = world.migrator(cmd, "--wave", wave, "--region", "ie")
            assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
        killed(world, rnd, ["cutover", "--wave", wave, "--region", "ie"], CUTOVER_POINTS)
        settled.append(settles(world, wave, ("us", "ie"), time.monotonic(), rollback=False, worst_s=WORST_S))
        res = world.migrator("cutover", "--wave", wave, "--region", "ie", "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert set(homes_of(world, wave, "ie").values()) == {"ie"}
        time.sleep(0.5)  # the writer writes at the new home
        killed(world, rnd, ["rollback", "--wave", wave, "--region", "ie", "--reason", "torture"], ROLLBACK_POINTS)
        settled.append(settles(world, wave, ("us", "ie"), time.monotonic(), rollback=True, worst_s=WORST_S))
        res = world.migrator("rollback", "--wave", wave, "--region", "ie", "--reason", "torture", "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert set(homes_of(world, wave, "ie").values()) == {"us"}
        for t in DEMO_OWNED:  # everything is back at the source; nothing of the shard stays at ie
            assert world.rows("ie", f"SELECT count(*) FROM {t}")[0][0] == 0, t
        res = world.migrator("release", "--wave", wave, "--shard", "ie-00", "--reason", "next trial")
        assert res.returncode == 0, res.stderr[-2000:]
    return settled
