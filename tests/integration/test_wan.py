"""Across an ocean: Ireland's server behind the relay (each direction held for half of
MIGRATOR_TEST_RTT_MS, 80 by default), the source and the control database beside the
command. What is counted is what the link charges for: the round trips (turns of the
conversation) and the connections each phase makes to the far region, per copied batch
and per cutover. Counts, not times: a change that adds round trips back fails here.

The ceilings are today's protocol (a fresh connection per operation, a statement per
round trip), measured on this suite's world; they are lowered as the protocol is."""

from __future__ import annotations

import json
import os

import pytest

from migrator.demo.relay import Relay
from tests.conftest import DEMO_OWNED, World

pytestmark = pytest.mark.integration

RTT_MS = float(os.environ.get("MIGRATOR_TEST_RTT_MS", "80"))

# round trips and connections to the far region: per batch the copy commits, and per cutover
# (measured on this world: 29 per batch over 6 batches, fixed costs included, 10 connections,
# 84 per cutover; the batch's BEGIN and its COMMIT ride with its first and last statements,
# and a cutover whose users no rollback left guarded there does not reach Ireland in its window)
CEILING = {"copy_round_trips_per_batch": 31, "copy_connections_per_batch": 2.0, "cutover_round_trips": 86}


def _far(world: World, relay: Relay) -> None:
    ie = world.spec["regions"]["ie"]["dsn"]
    host_port = ie.split("@", 1)[1].split("/", 1)[0]
    world.write_spec(regions={**world.spec["regions"], "ie": {"dsn": ie.replace(host_port, f"127.0.0.1:{relay.port}")}})


def _ok(res) -> dict:
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    return json.loads(res.stdout)


def test_round_trips_to_the_far_region_per_batch_and_per_cutover(world: World):
    host, port = world.dsn["ie"].split("@", 1)[1].split("/", 1)[0].split(":")
    with Relay((host, int(port)), rtt_ms=RTT_MS) as relay:
        _far(world, relay)
        world.write_spec(sharding={"shards_per_region": 1}, copy={"batch_users": 20})
        _ok(world.migrator("plan", "--region", "ie", "--json"))
        (shard,) = [s for s in _ok(world.migrator("status", "--json"))["shards"] if s["region"] == "ie"]
        with relay.counting() as copying:
            _ok(world.migrator("copy", "--shard", shard["name"], "--json"))
        _ok(world.migrator("verify", "--shard", shard["name"], "--json"))
        with relay.counting() as cutting:
            _ok(world.migrator("cutover", "--shard", shard["name"], "--json"))
    batches = shard["batches"]
    figures = {
        "copy_round_trips_per_batch": copying.round_trips / batches,
        "copy_connections_per_batch": copying.connections / batches,
        "cutover_round_trips": cutting.round_trips,
    }
    print(json.dumps({"rtt_ms": RTT_MS, "batches": batches, **figures}))
    assert batches >= 3
    for key, ceiling in CEILING.items():
        assert figures[key] <= ceiling, (key, figures[key], ceiling, figures)
    # and the copy is whole at the far end
    ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie'")]
    assert ids
    for table, q in DEMO_OWNED.items():
        assert world.rows("us", q, (ids,)) == world.rows("ie", q, (ids,)), table
