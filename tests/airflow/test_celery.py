"""Airflow with the CeleryExecutor: Debian's redis-server as the broker (started here on a
port of its own), PostgreSQL as the metadata database, and one Celery worker per
destination region, each a separate process serving its region's queue beside the
default one. A scheduled run moves every shard; the Irish worker is killed (SIGKILL, its
whole process group) while it copies, a replacement starts as a supervisor would start
one, and the run still ends green with every row at its home exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil
import pytest

from migrator.demo.airflow_services import AirflowServices
from migrator.demo.broker import MissingBroker, start_redis, stop_redis
from tests.conftest import DEMO_OWNED, World
from tests.helpers import airflow_for

pytest.importorskip("airflow.providers.celery")
pytestmark = [pytest.mark.airflow, pytest.mark.celery]


@pytest.fixture
def redis_url(tmp_path):
    try:
        proc, url = start_redis(tmp_path)
    except MissingBroker as exc:
        pytest.fail(str(exc))
    yield url
    stop_redis(proc)


def _session(sid: int) -> list[int]:
    out = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
    return out


def _paused_copies(world: World) -> int:
    if world.ctl("SELECT to_regclass('migrator.audit')")[0][0] is None:
        return 0  # not planned yet
    return world.ctl("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'paused at copied batch'")[0][0]


def test_celery_workers_per_region_and_a_worker_killed_mid_copy(world: World, tmp_path, redis_url):
    world.write_spec(sharding={"shards_per_region": 2}, copy={"batch_users": 20})
    home, env, meta = airflow_for(
        world,
        tmp_path,
        # a monthly interval: the run the scheduler makes on unpausing covers every seeded user
        MIGRATOR_SCHEDULE="0 0 1 * *",
        MIGRATOR_TASK_RETRIES="3",
        MIGRATOR_TASK_RETRY_DELAY_S="1",
        # a task whose worker is gone is failed (and retried) after 20 s without a heartbeat
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="5",
        # a task the killed worker had taken from the broker but not started is queued again
        AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT="30",
    )
    af = AirflowServices(
        home,
        env,
        meta,
        executor="CeleryExecutor",
        broker_url=redis_url,
        migrated=True,
    ).start()
    try:
        # the Irish worker stops after its first committed batch of each shard, to be killed there
        ie = af.worker(
            "worker-ie", ["default", "ie"], env={"MIGRATOR_PAUSE_AT": "copied batch", "MIGRATOR_PAUSE_S": "600"}
        )
        af.worker("worker-no", ["default", "no"])
        af.wait_for_dag("residency_migration")
        af.api("PATCH", "/dags/residency_migration", {"is_paused": False})
        deadline = time.monotonic() + 300
        while _paused_copies(world) == 0:
            assert time.monotonic() < deadline, "no Irish copy reached its first batch"
            time.sleep(0.5)
        # the worker and every process of its session (task processes take process groups of
        # their own, and outlive their parents): all gone at once, as when its machine is lost
        doomed = _session(ie.pid)
        assert len(doomed) > 2, doomed  # the worker, its pool, the paused task
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ie.wait()
        time.sleep(1)
        assert not _session(ie.pid)
        af.worker("worker-ie-2", ["default", "ie"])
        deadline = time.monotonic() + 900
        run = None
        while time.monotonic() < deadline:
            runs = af.runs("residency_migration")
            if runs and runs[0]["state"] in ("success", "failed"):
                run = runs[0]
                break
            time.sleep(3)
        assert run is not None, "the scheduled run did not finish"
        tis = af.tasks("residency_migration", run["dag_run_id"])
    finally:
        af.stop()
        with contextlib.suppress(Exception):
            print((home / "worker-ie-2.log").read_text()[-3000:])
    assert run["run_type"] == "scheduled"
    assert run["state"] == "success", [(t["task_id"], t.get("rendered_map_index"), t["state"]) for t in tis]
    by_task: dict[str, list[dict]] = {}
    for t in tis:
        by_task.setdefault(t["task_id"], []).append(t)
    for region in ("ie", "no"):
        for step in ("copy", "verify", "cutover"):
            mine = by_task[f"{region}.{step}"]
            assert mine and all(t["queue"] == region for t in mine), (region, step)
            assert all(str(t["rendered_map_index"]).startswith(f"{region}-") for t in mine)
    assert by_task["plan"][0]["queue"] == "default"
    # an Irish copy ran again after its worker was killed, and resumed from its checkpoint
    assert any(t["try_number"] > 1 for t in by_task["ie.copy"]), by_task["ie.copy"]
    states = dict(world.ctl("SELECT name, state FROM migrator.shard"))
    assert set(states.values()) == {"cut_over"}, states
    for region in ("ie", "no"):
        ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = %s", (region,))]
        assert ids
        for table, q in DEMO_OWNED.items():
            # equal row for row: nothing lost, nothing written twice
            assert world.rows("us", q, (ids,)) == world.rows(region, q, (ids,)), (region, table)
        n = world.rows(region, "SELECT count(*), count(DISTINCT user_id) FROM users")[0]
        assert n[0] == n[1] == len(ids)
