"""A tiny run of the benchmark's Airflow figures keeps them working (a real scheduler,
dag-processor and api-server, with the LocalExecutor and with the CeleryExecutor and two
workers; one DAG run and one CLI run each); their figures are not asserted on."""

from __future__ import annotations

import pytest

from tests.helpers import bench

pytest.importorskip("airflow.sdk")
pytestmark = pytest.mark.airflow


def test_bench_airflow_smoke():
    doc = bench(
        "--scale", "0.02", "--runs", "0", "--objects", "0", "--airflow", "--airflow-runs", "1",
        "--airflow-executors", "local,celery",
    )  # fmt: skip
    a = doc["airflow"]
    # its target is for scale 1: reported, not judged, here
    assert doc["targets"]["airflow_vs_cli"] == {
        "value": a["airflow_vs_cli"],
        "target": "<= 1.15 (at scale 1)",
        "met": None,
    }
    assert a["runs"] == 1 and a["shards"] == 4 and a["executor"] == "LocalExecutor"
    assert a["cli_s"] > 0 and a["airflow_s"] > 0 and a["airflow_vs_cli"] > 0
    # every task of a shard's path ran (and succeeded) in the timed run
    assert {"plan", "copy", "verify", "cutover", "report"} <= set(a["task_s_median"])
    split = a["airflow_split_s"]
    assert split["in_tasks_s"] > 0 and abs(sum(split.values()) - a["airflow_s"]) < 0.5
    assert a["machine_cpu_s"]["airflow"] > 0 and a["machine_cpu_s"]["cli"] > 0
    # the split by process: the DAG's run spent CPU in the scheduler's task processes (given with
    # the scheduler's own when an executor worker exited during a run), the CLI's in the
    # benchmark's own process (where the engine runs), and each in the benchmark's databases
    # (only its own servers: the suite's other tests start and stop theirs meanwhile)
    by = a["machine_cpu_s_by_process"]
    tasks = "scheduler" if a["forks_exited"] else "scheduler forks' children"
    assert by["airflow"][tasks] > 0 and by["cli"]["bench"] > 0
    assert by["airflow"]["postgres"] > 0 and by["cli"]["postgres"] > 0

    c = doc["airflow_celery"]
    assert doc["targets"]["airflow_celery_vs_cli"]["met"] is None
    assert c["executor"] == "CeleryExecutor" and c["workers"] == ["worker-1", "worker-2"]
    assert c["cli_s"] > 0 and c["airflow_s"] > 0
    assert {"plan", "copy", "verify", "cutover", "report"} <= set(c["task_s_median"])
    # the tasks ran in the Celery workers' processes, not the scheduler's
    by = c["machine_cpu_s_by_process"]["airflow"]
    assert sum(v for k, v in by.items() if k.startswith("worker-")) > 0, by
