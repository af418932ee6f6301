"""The plan through the Airflow DAG against the command line, and where the CPU went."""

from __future__ import annotations

import os
import statistics
import time
from datetime import datetime
from pathlib import Path

import psycopg
import yaml

from bench.dataset import truncate
from migrator.control.context import Context
from migrator.demo.embedded import Cluster
from migrator.spec import parse_spec


def busy_intervals(tasks: list[dict]) -> tuple[float, float, float]:
    """(first start, last end, seconds during which at least one task instance was running)
    of a run's task instances, from their start and end dates."""
    spans = sorted(
        (datetime.fromisoformat(t["start_date"]).timestamp(), datetime.fromisoformat(t["end_date"]).timestamp())
        for t in tasks
        if t.get("start_date") and t.get("end_date")
    )
    busy, cur_start, cur_end = 0.0, *spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start = start
        cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return spans[0][0], max(e for _, e in spans), busy


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def cpu_by_process(
    services: dict[str, int], postmasters: set[int], named: dict[int, str] | None = None
) -> tuple[dict[str, float], set[int]]:
    """CPU seconds each part of the machine has spent so far (its processes and the children
    they have reaped): each Airflow service by its session (`services`: name -> session id),
    the benchmark's PostgreSQL servers (`postmasters` and the backends they started), this
    process (the tool, in a CLI run), the processes `named` (pid -> name, such as the Celery
    broker), the rest ("other": whatever else the machine runs,
    which can come out negative when a process of it exits unreaped by another); and the
    pids of the processes the services forked (see `merge_forks`)."""
    import psutil

    me = os.getpid()
    out: dict[str, float] = {}
    forks: set[int] = set()
    for p in psutil.process_iter(["ppid", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is None:
            continue
        try:
            sid = os.getsid(p.pid)
        except OSError:
            continue
        service = next((n for n, s in services.items() if s == sid), None)
        if service is None:
            ours = p.pid in postmasters or p.info["ppid"] in postmasters
            role = "postgres" if ours else "bench" if p.pid == me else (named or {}).get(p.pid, "other")
            out[role] = out.get(role, 0.0) + t.user + t.system + t.children_user + t.children_system
            continue
        # a service's main process; the processes it forked (the executor's workers); what
        # those reaped (the task processes they supervised)
        if p.pid != sid:
            forks.add(p.pid)
        own = service if p.pid == sid else f"{service} forks"
        out[own] = out.get(own, 0.0) + t.user + t.system
        reaped = service if p.pid == sid else f"{service} forks' children"
        out[reaped] = out.get(reaped, 0.0) + t.children_user + t.children_system
    return out, forks


def merge_forks(split: dict[str, float], services: list[str]) -> dict[str, float]:
    """A service's forks and what they reaped, folded into the service. Needed when a fork
    exited during the span: its CPU then moved into its parent's reaped children, so the
    two parts' differences are not each one's share (a part can come out negative), while
    their sum is still the service's."""
    out = dict(split)
    for svc in services:
        out[svc] = out.get(svc, 0.0) + out.pop(f"{svc} forks", 0.0) + out.pop(f"{svc} forks' children", 0.0)
    return out


def bench_airflow(
    cluster: Cluster,
    dst: str,
    control: str,
    spec: dict,
    base: Path,
    runs: int,
    idle_sleep_s: float | None,
    preload: bool = True,
    slots: int | None = None,
    executor: str = "LocalExecutor",
) -> dict:
    """The same plan through the residency_migration DAG under a real scheduler, dag-processor
    and api-server (PostgreSQL metadata), with the LocalExecutor or the CeleryExecutor and two
    workers (each serving the default queue and the destination regions', Debian's
    redis-server as the broker), triggered through the REST API and
    timed from the trigger to the run's end; against the CLI engine on the same plan, the
    two alternating, `runs` of each (medians). Where the DAG's time went, from its task
    instances: in tasks (at least one running) or between them (none running: the
    scheduler handing over, a task process starting)."""
    from migrator.demo.airflow_run import airflow_env, spec_for_airflow
    from migrator.demo.airflow_services import AirflowServices
    from migrator.lifecycle import engine

    def reset():
        truncate(dst)
        with psycopg.connect(control) as c:
            c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")
        with psycopg.connect(spec["regions"]["us"]["dsn"]) as c:
            c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")

    base.mkdir(parents=True, exist_ok=True)
    aspec = dict(spec, sharding={"shards_per_region": 4})
    path = base / "airflow-spec.yaml"
    path.write_text(yaml.safe_dump(aspec))
    home = base / "airflow"
    home.mkdir(exist_ok=True)
    af_spec, conns = spec_for_airflow(path, base / "spec.airflow.yaml")
    env = airflow_env(home, conns)
    if not preload:
        (home / "config" / "airflow_local_settings.py").unlink()
    # no scheduled run before the triggered one: the first yearly interval ends in the future
    env.update(
        MIGRATOR_SPEC=str(af_spec), MIGRATOR_SCHEDULE="0 0 1 1 *", AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True"
    )
    if idle_sleep_s is not None:
        env["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] = str(idle_sleep_s)
    meta_db = "airflow" if executor == "LocalExecutor" else "airflow_" + executor.removesuffix("Executor").lower()
    meta = cluster["src"].create_database(meta_db).replace("postgresql://", "postgresql+psycopg://", 1)
    # The pool's slots are the shards copying from the source at once: the source's cores
    # over 2, as docs/capacity.md says (here source, destination and tool
    # share the cores; on 2 cores, 2 slots measured 1.34, 1.48 and 1.72 of the CLI, 1 slot 1.16 and 1.58).
    slots = slots or max(1, (os.cpu_count() or 2) // 2)
    broker = None
    if executor == "CeleryExecutor":
        from migrator.demo.broker import start_redis

        broker, url = start_redis(base)
        af = AirflowServices(home, env, meta, pool_slots=slots, executor=executor, broker_url=url).start()
        # two workers, each serving the default queue and every destination region's
        regions = sorted({r for r in spec["policy"].values() if r != "us"})
        for n in (1, 2):
            af.worker(f"worker-{n}", ["default", *regions])
    else:
        af = AirflowServices(home, env, meta, pool_slots=slots).start()
    cli: list[float] = []
    dag: list[float] = []
    split: list[dict[str, float]] = []
    per_task: dict[str, list[float]] = {}

    cpu: dict[str, list[float]] = {"cli": [], "airflow": []}
    by_process: dict[str, list[dict[str, float]]] = {"cli": [], "airflow": []}
    sessions = {name: proc.pid for name, proc in af.procs.items()}
    named = {broker.pid: "redis-server"} if broker is not None else {}
    # each server's postmaster, from the pid file it keeps in its data directory
    postmasters = {int((s.data / "postmaster.pid").read_text().split()[0]) for s in cluster.servers.values()}

    exited = False  # whether a service's fork exited during a timed run (see merge_forks)

    def split_cpu(kind: str, before: tuple[dict[str, float], set[int]]) -> None:
        nonlocal exited
        after, forks = cpu_by_process(sessions, postmasters, named)
        exited = exited or bool(before[1] - forks)
        by_process[kind].append({k: after[k] - before[0].get(k, 0.0) for k in after})

    def through_airflow() -> float:
        reset()
        p0 = cpu_by_process(sessions, postmasters, named)
        c0 = busy_cpu_s()
        t0 = time.time()
        run = af.api("POST", "/dags/residency_migration/dagRuns", {"logical_date": None, "conf": {"scope": "all"}})
        done = af.run_state("residency_migration", run["dag_run_id"], {"success", "failed"}, timeout=3600)
        # to the end Airflow recorded for the run, not to when the poll (once a second) saw it
        elapsed = datetime.fromisoformat(done["end_date"]).timestamp() - t0
        cpu["airflow"].append(busy_cpu_s() - c0)
        split_cpu("airflow", p0)
        assert done["state"] == "success", "the DAG run failed"
        tis = af.tasks("residency_migration", run["dag_run_id"])
        first, last, busy = busy_intervals(tis)
        span = last - first
        split.append({"in_tasks_s": busy, "between_tasks_s": span - busy, "around_s": elapsed - span})
        for t in tis:
            if t.get("duration") is not None and t["state"] == "success":
                per_task.setdefault(t["task_id"].split(".")[-1], []).append(float(t["duration"]))
        return elapsed

    def through_cli() -> float:
        reset()
        p0 = cpu_by_process(sessions, postmasters, named)
        c0 = busy_cpu_s()
        t0 = time.perf_counter()
        _, outcomes = engine.run(Context(parse_spec(aspec)), "cli")
        elapsed = time.perf_counter() - t0
        cpu["cli"].append(busy_cpu_s() - c0)
        split_cpu("cli", p0)
        assert all(o.ok for o in outcomes) and len(outcomes) == 4
        return elapsed

    try:
        af.wait_for_dag("residency_migration")
        af.api("PATCH", "/dags/residency_migration", {"is_paused": False})
        # One whole run first, untimed: the executor starts a worker process the first time
        # it has more tasks at once than workers (4 s each here), which a scheduler that has
        # been running has long done.
        through_airflow()
        split.clear()
        per_task.clear()
        c0 = busy_cpu_s()
        time.sleep(5)
        idle_cpu = (busy_cpu_s() - c0) / 5
        for run in range(runs):
            for step in (through_cli, through_airflow) if run % 2 == 0 else (through_airflow, through_cli):
                (cli if step is through_cli else dag).append(step())
    finally:
        af.stop()
        if broker is not None:
            from migrator.demo.broker import stop_redis

            stop_redis(broker)
    med = statistics.median
    if exited:  # in every run alike, so the medians add up
        by_process = {k: [merge_forks(d, list(sessions)) for d in v] for k, v in by_process.items()}
    return {
        "runs": runs,
        "cli_s": round(med(cli), 2),
        "airflow_s": round(med(dag), 2),
        "airflow_vs_cli": round(med(dag) / med(cli), 3),
        "cli_s_each": [round(x, 2) for x in cli],
        "airflow_s_each": [round(x, 2) for x in dag],
        "airflow_split_s": {k: round(med(d[k] for d in split), 2) for k in split[0]},
        "task_s_median": {k: round(med(v), 2) for k, v in sorted(per_task.items())},
        "machine_cpu_s": {k: round(med(v), 1) for k, v in cpu.items()},
        "machine_cpu_s_by_process": {
            kind: {k: round(med(d.get(k, 0.0) for d in runs_), 1) for k in sorted({k for d in runs_ for k in d})}
            for kind, runs_ in by_process.items()
        },
        "forks_exited": exited,
        "idle_airflow_cores": round(idle_cpu, 3),
        "executor": executor,
        "workers": sorted(k for k in sessions if k.startswith("worker-")),
        "pool_slots": slots,
        "scheduler_idle_sleep_s": float(af.env["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"]),
        "preload": preload,
        "shards": 4,
        "note": "airflow_s is from the REST API's trigger to the run's end, under a scheduler, dag-processor "
        "and api-server already running (their start-up is not counted) that have run the migration once before; "
        "airflow_split_s: in_tasks_s while at least one task instance ran, between_tasks_s while none did, "
        "around_s from the trigger to the first task's start and from the last task's end to the run's end; "
        "machine_cpu_s: CPU seconds the whole machine spent (all processes) during each CLI and DAG run; "
        "machine_cpu_s_by_process: the same split by process (each Airflow service, the processes it forked "
        "such as the executor's workers, the task processes those reaped, each Celery worker and the broker "
        "(redis-server) under the CeleryExecutor, the PostgreSQL servers, the benchmark process that runs the CLI's "
        "engine; with forks_exited, a fork exited during a run and each service's "
        "parts are given as one); "
        "idle_airflow_cores: the machine's busy cores with Airflow running and nothing triggered",
    }


# --airflow-executors: name -> (Airflow's executor, the document's key)
EXECUTORS = {"local": ("LocalExecutor", "airflow"), "celery": ("CeleryExecutor", "airflow_celery")}
