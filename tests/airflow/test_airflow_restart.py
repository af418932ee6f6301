"""The scheduler killed (SIGKILL, every process of its session) while a run's cutovers
wait for their approvals: one approval is answered while no scheduler runs, a new
scheduler is started, the other is answered then; the first answer is not lost (not asked
again), both shards cut over and the run ends green, checked against the stores with SQL
written here."""

from __future__ import annotations

import os
import signal
import time

import pytest

from migrator.demo.airflow_services import AirflowServices
from tests.conftest import DEMO_OWNED, World
from tests.helpers import live_airflow, trigger

pytest.importorskip("airflow.sdk")
pytestmark = pytest.mark.airflow

RUN_STATE = "/dags/residency_migration/dagRuns/{run}"
HITL = "/dags/residency_migration/dagRuns/{run}/taskInstances/no.cutover/{index}/hitlDetails"


def _approvals(af: AirflowServices, run: str) -> list[dict]:
    return [t for t in af.tasks("residency_migration", run) if t["task_id"] == "no.cutover" and t["map_index"] >= 0]


def _states(world: World) -> set[str]:
    return {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'")}


def test_the_scheduler_killed_while_cutovers_wait_for_approval(world: World, tmp_path):
    world.write_spec(sharding={"shards_per_region": 2})
    with live_airflow(world, tmp_path) as af:
        run = trigger(af, {"scope": "all", "regions": ["no"], "approve_cutover": True})
        deadline = time.monotonic() + 300
        while len([t for t in _approvals(af, run) if t["state"] == "awaiting_input"]) < 2:
            assert time.monotonic() < deadline, [(t["map_index"], t["state"]) for t in _approvals(af, run)]
            time.sleep(1)
        assert _states(world) == {"verified"}

        scheduler = af.procs["scheduler"]
        os.killpg(scheduler.pid, signal.SIGKILL)
        scheduler.wait()
        first, second = sorted(t["map_index"] for t in _approvals(af, run))
        # answered while no scheduler runs: taken, and nothing is cut over without one
        af.api("PATCH", HITL.format(run=run, index=first), {"chosen_options": ["Approve"], "params_input": {}})
        assert af.api("GET", HITL.format(run=run, index=first))["response_received"]
        time.sleep(3)
        assert _states(world) == {"verified"}

        af.spawn("scheduler", "scheduler")
        answered = {first}
        deadline = time.monotonic() + 600
        while af.api("GET", RUN_STATE.format(run=run))["state"] not in ("success", "failed"):
            assert time.monotonic() < deadline, "the run did not end"
            for t in _approvals(af, run):
                # the other shard's, and any approval a new try asks again
                if t["state"] == "awaiting_input":
                    path = HITL.format(run=run, index=t["map_index"])
                    af.api("PATCH", path, {"chosen_options": ["Approve"], "params_input": {}})
                    answered.add(t["map_index"])
            time.sleep(1)
        state = af.api("GET", RUN_STATE.format(run=run))["state"]
        tis = af.tasks("residency_migration", run)
    assert state == "success", [(t["task_id"], t.get("map_index"), t["state"]) for t in tis]
    assert second in answered
    # the answer given while no scheduler ran is the one that counted: that approval was not asked again
    ((approval,),) = [[t] for t in tis if t["task_id"] == "no.cutover" and t["map_index"] == first]
    assert approval["state"] == "success" and approval["try_number"] == 1, approval
    assert _states(world) == {"cut_over"}
    ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'no'")]
    assert ids
    for table, q in DEMO_OWNED.items():
        assert world.rows("us", q, (ids,)) == world.rows("no", q, (ids,)), table
