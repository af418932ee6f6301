"""`python -m bench --scale S --json`: the tool's phases against peers, in one run.

Source and destination are separate PostgreSQL servers started here; the destination is
truncated between runs; each figure is the median of --runs runs:
* copy against the raw `psql \\copy ... (FORMAT binary)` pipe per table (planning is timed
  apart: the pipe has no counterpart to it);
* verify against reladiff (-j 4) on the same tables, and once more with one row changed
  at the destination, which both must find;
* object copy against a plain boto3 GET/PUT loop with the same threads (--objects);
* with --writes: the fence window (p50/p99 over shards) and a writer's throughput during a
  migration against without one.
It prints one JSON document and writes a PNG chart (--chart).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from migrator.control.context import Context
from migrator.demo import seed
from migrator.demo.embedded import Cluster, bindir
from migrator.phases.copy import copy_shard
from migrator.phases.plan import Plan, plan
from migrator.phases.verify import compare_shard
from migrator.spec import parse_spec
from migrator.stores import sqlgen

ROOT = Path(__file__).resolve().parent.parent


def server_settings(scale: float) -> dict[str, str]:
    """Both servers, for the pipe and the tool alike: buffers that hold the scale's data
    (about 0.9 GB at the source per unit of scale) and WAL sized for a bulk load, so a
    larger scale is not slowed by evictions and checkpoints that a smaller one escapes."""
    return {
        "shared_buffers": f"{max(1024, round(1280 * scale))}MB",
        "max_wal_size": "8GB",
        "checkpoint_timeout": "30min",
    }


TABLES = ["users", "videos", "comments", "login_events", "devices"]


def raw_pipe(ctx: Context, psql: str, src: str, dst: str, region: str) -> float:
    codes = [c for c, r in ctx.spec.policy.items() if r == region]
    t0 = time.perf_counter()
    for name in ctx.tables:
        own = sqlgen.ownership(ctx.spec.entity_graph, name)
        q = psycopg.sql.SQL(
            "SELECT t0.* FROM {} WHERE {} IN (SELECT user_id FROM users WHERE country_code = ANY({}))"
        ).format(own.from_, own.owner, psycopg.sql.Literal(codes))
        with psycopg.connect(src) as c:
            text = q.as_string(c)
        cmd = (
            f"{psql} '{src}' -qc \"\\copy ({text}) TO STDOUT (FORMAT binary)\" | "
            f"{psql} '{dst}' -qc \"\\copy {name} FROM STDIN (FORMAT binary)\""
        )
        subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)
    return time.perf_counter() - t0


def parallel_pipe(ctx: Context, psql: str, src: str, dst: str, region: str, workers: int) -> float:
    """What a user would write by hand to match the tool's `copy.workers`: that many raw
    pipes at once, each moving every table (parents first, as the foreign keys need) for
    its share of the users (user_id modulo the workers)."""
    from concurrent.futures import ThreadPoolExecutor

    codes = [c for c, r in ctx.spec.policy.items() if r == region]
    texts: list[list[tuple[str, str]]] = []
    with psycopg.connect(src) as c:
        for k in range(workers):
            lane = []
            for name in ctx.tables:
                own = sqlgen.ownership(ctx.spec.entity_graph, name)
                q = psycopg.sql.SQL(
                    "SELECT t0.* FROM {} WHERE {} IN (SELECT user_id FROM users WHERE country_code = ANY({}) "
                    "AND user_id % {} = {})"
                ).format(own.from_, own.owner, psycopg.sql.Literal(codes), workers, k)
                lane.append((name, q.as_string(c)))
            texts.append(lane)

    def run_lane(lane: list[tuple[str, str]]) -> None:
        for name, text in lane:
            cmd = (
                f"{psql} '{src}' -qc \"\\copy ({text}) TO STDOUT (FORMAT binary)\" | "
                f"{psql} '{dst}' -qc \"\\copy {name} FROM STDIN (FORMAT binary)\""
            )
            subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run_lane, texts))
    return time.perf_counter() - t0


def row_of(c: psycopg.Connection, query: str, args: Any = None) -> tuple:
    """The one row a query returns (an aggregate's, a RETURNING's)."""
    r = c.execute(query, args).fetchone()
    assert r is not None, query
    return r


def unchecked(dsn: str) -> str:
    """The same database, every session with its triggers skipped (foreign-key checks among
    them): what a hand-written pipe that trusts its input could do."""
    return dsn + ("&" if "?" in dsn else "?") + "options=-csession_replication_role%3Dreplica"


def left(src: str) -> dict[str, int]:
    """Rows per table, and rows not yet pseudonymised in the pseudonymised tables."""
    with psycopg.connect(src) as c:
        out = {t: row_of(c, f"SELECT count(*) FROM {t}")[0] for t in TABLES}
        out["users in clear"] = row_of(c, "SELECT count(*) FROM users WHERE email NOT LIKE 'pz1_%'")[0]
        out["logins in clear"] = row_of(
            c,
            # (the seeded IPv6 addresses are documentation addresses already)
            "SELECT count(*) FROM login_events WHERE family(ip) = 4 AND NOT ip <<= inet '240.0.0.0/4'",
        )[0]
    return out


def raw_purge(src: str, codes: list[str]) -> float:
    """What a DBA would run by hand to retire the same users' source copy: one statement per
    table over all of them in one transaction, the rows the spec deletes deleted and the
    columns it pseudonymises overwritten with unkeyed values of the same shape (the same
    row versions, index entries and WAL as the tool's purge, none of its checks)."""
    eu = "(SELECT user_id FROM users WHERE country_code = ANY(%(codes)s))"
    statements = [
        f"DELETE FROM devices WHERE user_id IN {eu}",
        f"DELETE FROM comments c USING videos v WHERE c.video_id = v.video_id AND v.user_id IN {eu}",
        f"DELETE FROM videos WHERE user_id IN {eu}",
        "UPDATE login_events SET ip = CASE WHEN family(ip) = 4 THEN inet '240.0.0.1' ELSE inet '2001:db8::1' END "
        f"WHERE user_id IN {eu}",
        "UPDATE users SET email = 'pz1_' || md5(email), display_name = 'pz1_' || md5(display_name) "
        "WHERE country_code = ANY(%(codes)s)",
    ]
    t0 = time.perf_counter()
    with psycopg.connect(src) as c:
        for q in statements:
            c.execute(q, {"codes": codes})
    return time.perf_counter() - t0


def bench_objects(a, src_db: str, control: str, spec: dict, runs: int) -> dict:
    """objects/s and MB/s of the tool's object copy against a plain boto3 GET/PUT loop with
    the same thread count, between two S3 endpoints (moto servers) started here."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from migrator.demo.embedded import LocalS3
    from migrator.phases import copy_objects

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    servers = {r: LocalS3(r).start() for r in ("us", "ie")}
    try:
        cl = {r: boto3.client("s3", endpoint_url=s.endpoint, region_name="us-east-1") for r, s in servers.items()}
        cl["us"].create_bucket(Bucket="media-us")
        with psycopg.connect(src_db) as c:
            eu = [
                u
                for (u,) in c.execute(
                    "SELECT user_id FROM users WHERE country_code = ANY(%s) ORDER BY user_id LIMIT %s",
                    ([k for k, r in spec["policy"].items() if r != "us"], a.objects),
                )
            ]
            # The wave holds just the users who own these objects (users are created in id
            # order): the figure is the object copy's, whatever the scale of the rows.
            (until,) = row_of(
                c, "SELECT max(created_at) + interval '1 microsecond' FROM users WHERE user_id <= %s", (max(eu),)
            )
        body = os.urandom(a.object_kb * 1024)
        keys = [f"users/{u}/media.bin" for u in eu]
        with ThreadPoolExecutor(a.threads) as pool:
            list(pool.map(lambda k: cl["us"].put_object(Bucket="media-us", Key=k, Body=body), keys))
        ospec = dict(
            spec,
            objects={
                "user_prefix": "users/{user}/",
                "threads": a.threads,
                "stores": {
                    "us": {"endpoint": servers["us"].endpoint, "bucket": "media-us"},
                    "ie": {"endpoint": servers["ie"].endpoint, "bucket": "media-ie"},
                },
            },
        )
        plain, tool = [], []
        for run in range(runs):
            bucket = f"plain-{run}"
            cl["ie"].create_bucket(Bucket=bucket)

            def one(k, bucket=bucket):
                data = cl["us"].get_object(Bucket="media-us", Key=k)["Body"].read()
                cl["ie"].put_object(Bucket=bucket, Key=k, Body=data)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(a.threads) as pool:
                list(pool.map(one, keys))
            plain.append(time.perf_counter() - t0)

            cl["ie"].create_bucket(Bucket=f"tool-{run}")
            ospec["objects"]["stores"]["ie"]["bucket"] = f"tool-{run}"
            with psycopg.connect(control) as c:
                c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")
            ctx = Context(parse_spec(ospec))
            p = plan(ctx, f"objects-{run}", until=until)
            assert sum(x.users for x in p.shards) == len(eu)
            t0 = time.perf_counter()
            for s in p.shards:
                res = copy_objects.copy_batches(
                    ctx, s.shard_id, s.region, ctx.spec.source_region, ctx.control.batch_keys(s.shard_id, ctx.sort_keys)
                )
                assert res.copied > 0
            tool.append(time.perf_counter() - t0)
        med = statistics.median
        mb = len(keys) * a.object_kb / 1024
        return {
            "objects": len(keys),
            "object_kb": a.object_kb,
            "threads": a.threads,
            "runs": runs,
            "plain_loop_s": round(med(plain), 3),
            "tool_objects_s": round(med(tool), 3),
            "tool_objects_per_s": round(len(keys) / med(tool), 1),
            "tool_mb_per_s": round(mb / med(tool), 2),
            "plain_objects_per_s": round(len(keys) / med(plain), 1),
            "objects_vs_plain": round(med(plain) / med(tool), 3),
        }
    finally:
        for srv in servers.values():
            srv.stop()


def owner_where(table: str, codes: list[str]) -> str:
    eu = "SELECT user_id FROM users WHERE country_code IN (" + ", ".join(f"'{c}'" for c in codes) + ")"
    if table == "users":
        return f"user_id IN ({eu})"
    if table == "comments":
        return f"video_id IN (SELECT video_id FROM videos WHERE user_id IN ({eu}))"
    return f"user_id IN ({eu})"


def reladiff(ctx: Context, src: str, dst: str, codes: list[str], threads: int = 4) -> tuple[float, list[dict]]:
    """reladiff over every table of the graph, limited to the moved users; seconds and the
    differing rows it reported."""
    exe = shutil.which("reladiff") or str(Path(sys.executable).parent / "reladiff")
    found: list[dict] = []
    t0 = time.perf_counter()
    for name, table in ctx.tables.items():
        cmd = [exe, src, name, dst, name, "--json", "-j", str(threads), "-w", owner_where(name, codes)]
        for k in table.pk:
            cmd += ["-k", k]
        for c in table.columns:
            if c.name not in table.pk:
                cmd += ["-c", c.name]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if res.returncode != 0 or "ERROR" in res.stderr:  # it exits 0 on some failures
            raise RuntimeError(f"reladiff failed on {name}: {res.stderr[-500:]}")
        for line in res.stdout.splitlines():  # [sign, [key..., values...]], not always valid JSON
            if line.strip().startswith("["):
                strings = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
                found.append({"table": name, "sign": strings[0], "key": strings[1 : 1 + len(table.pk)]})  # keys only
    return time.perf_counter() - t0, found


def _migrate_with_writer(src: str, dst: str, control: str, spec: dict, users: list[int], first_event: int) -> dict:
    from migrator.demo.workload import WriterProcess, check
    from migrator.lifecycle import engine

    truncate(dst)
    for d in (control, src):
        with psycopg.connect(d) as c:
            c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")
    dsn = {"us": src, "ie": dst}
    ctx = Context(parse_spec(spec))
    w = WriterProcess(dsn, control, users, threads=2, rate_hz=1e6, first_event=first_event).start()
    t0 = time.perf_counter()
    _, outcomes = engine.run(ctx, "writes")
    elapsed = time.perf_counter() - t0
    acked = w.stop()
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    check(dsn, control, acked)  # raises if a write was lost
    with psycopg.connect(control) as c:
        closed = [d for (d,) in c.execute("SELECT detail FROM migrator.audit WHERE detail->>'event' = 'fence closed'")]
        (rows,) = row_of(
            c,
            "SELECT sum(r.n::bigint) FROM migrator.audit a, jsonb_each_text(a.detail->'rows') AS r(t, n) "
            "WHERE a.detail->>'event' = 'copied'",
        )
        # the seconds the shards spent copying (from entering `copying` to `copied`), summed
        (copying,) = row_of(
            c,
            "SELECT sum(extract(epoch FROM d.at - s.at)) FROM migrator.audit d JOIN LATERAL ("
            "  SELECT max(a.at) AS at FROM migrator.audit a WHERE a.shard_id = d.shard_id AND a.to_state = 'copying'"
            "  AND a.from_state IS DISTINCT FROM 'copying' AND a.at <= d.at) s ON true "
            "WHERE d.detail->>'event' = 'copied'",
        )
    return {
        "elapsed": elapsed,
        "acked": acked,
        "errors": w.errors,
        "closed": closed,
        "rows": int(rows or 0),
        "copying_s": float(copying or 0),
    }


def bench_writes(a, src: str, dst: str, control: str, spec: dict, seconds: float = 5.0) -> dict:
    """A writer as fast as it goes: alone, then while every shard moves with the fence, and
    once more for each of `a.throttle_divisors` with the copy's throttle holding each shard
    to that fraction (a third, a quarter, ...) of the rate its copy reached the first time,
    which holds the verify's reads at the source to it as well (copying_s: the seconds the
    shards spent copying, summed). The headline throttled figures are the last setting's."""
    from migrator.demo.workload import WriterProcess

    truncate(dst)
    for d in (control, src):
        with psycopg.connect(d) as c:
            c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")
    with psycopg.connect(src) as c:
        users = [u for (u,) in c.execute("SELECT user_id FROM users WHERE user_id % 11 = 0 ORDER BY user_id LIMIT 400")]
    dsn = {"us": src, "ie": dst}
    w = WriterProcess(dsn, control, users, threads=2, rate_hz=1e6).start()
    time.sleep(seconds)
    alone = w.stop().ops / seconds
    # batches small enough for the throttle to act between them (it waits before a batch)
    wspec = dict(spec, sharding={"shards_per_region": 8}, copy={**spec.get("copy", {}), "batch_users": 1000})
    # What the writer pays with nothing copied: every shard planned (the directory has its
    # users), then each shard's changes captured too (the guard trigger on every write, and
    # a log row for each write of a moving user); no copy, verify or cutover runs.
    from migrator.capture.triggers import start_capture

    ctx = Context(parse_spec(wspec))
    planned = plan(ctx, "writer-baseline")
    w = WriterProcess(dsn, control, users, threads=2, rate_hz=1e6, first_event=10**9 + 5 * 10**8).start()
    time.sleep(seconds)
    directory_only = w.stop().ops / seconds
    for s in planned.shards:
        start_capture(ctx, src, s.shard_id)
    w = WriterProcess(dsn, control, users, threads=2, rate_hz=1e6, first_event=10**9 + 7 * 10**8).start()
    time.sleep(seconds)
    captured_only = w.stop().ops / seconds
    free = _migrate_with_writer(src, dst, control, wspec, users, 2 * 10**9)
    settings = []
    for i, divisor in enumerate(a.throttle_divisors):
        # each shard held to 1/divisor of the rate its copy reached without the throttle
        ceiling = max(1, int(free["rows"] / max(free["copying_s"], 1e-3) / divisor))
        tspec = dict(wspec, copy={**wspec.get("copy", {}), "throttle": {"max_rows_per_s": ceiling}})
        held = _migrate_with_writer(src, dst, control, tspec, users, (3 + i) * 10**9)
        ops = held["acked"].ops / held["elapsed"]
        settings.append(
            {
                "divisor": divisor,
                "rows_per_s_per_shard": ceiling,
                "writer_ops_per_s": round(ops, 1),
                "writer_during_vs_alone": round(ops / alone, 3),
                "migration_s": round(held["elapsed"], 2),
                "copying_s": round(held["copying_s"], 2),
                "errors": held["errors"][:3],
            }
        )
    closed = free["closed"]
    fences = sorted(float(d["fence_ms"]) for d in closed)
    steps = {
        k: round(statistics.median(d["fence_steps_ms"].get(k, 0.0) for d in closed), 1)
        for k in (closed[0]["fence_steps_ms"] if closed else {})
    }
    q = statistics.quantiles(fences, n=100, method="inclusive") if len(fences) > 1 else fences * 99
    during = free["acked"].ops / free["elapsed"]
    last = settings[-1]
    return {
        "shards": len(fences),
        "fence_ms_p50": round(statistics.median(fences), 1),
        "fence_ms_p99": round(q[98], 1),
        "fence_steps_ms_p50": steps,
        "writer_ops_per_s_alone": round(alone, 1),
        "writer_ops_per_s_during": round(during, 1),
        "writer_during_vs_alone": round(during / alone, 3),
        "writer_planned_vs_alone": round(directory_only / alone, 3),
        "writer_captured_vs_alone": round(captured_only / alone, 3),
        "throttle_divisor": last["divisor"],
        "throttle_rows_per_s_per_shard": last["rows_per_s_per_shard"],
        "writer_ops_per_s_during_throttled": last["writer_ops_per_s"],
        "writer_during_vs_alone_throttled": last["writer_during_vs_alone"],
        "migration_s": round(free["elapsed"], 2),
        "migration_throttled_s": last["migration_s"],
        "copying_s": round(free["copying_s"], 2),
        "copying_throttled_s": last["copying_s"],
        "throttle_settings": [{k: v for k, v in t.items() if k != "errors"} for t in settings],
        "fenced_retries": free["acked"].fenced,
        "lost_writes": 0,
        "writer_errors": (free["errors"] + [e for t in settings for e in t["errors"]])[:3],
        "writer_ops_during": free["acked"].ops,
    }


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


def chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    life = doc.get("lifecycle_s") or {}
    bars_of = {
        "pipe": doc["raw_pipe_s"],
        f"{doc['copy_workers']} pipes": doc["parallel_pipe_s"],
        "unchecked": doc.get("unchecked_parallel_pipe_s", 0),
        "plan": doc["plan_s"],
        "copy": doc["copy_s"],
        "verify": doc["verify_s"],
        "reladiff": doc.get("reladiff_s") or 0,
        "cutover": life.get("cutover", 0),
        "rollback": doc.get("rollback_s", 0),
        "purge": life.get("purge", 0),
        "hand purge": doc.get("raw_purge_s", 0),
    }
    labels, values = list(bars_of), list(bars_of.values())
    fig, ax = plt.subplots(figsize=(10, 3.4))
    colors = ["#888", "#555", "#bbb", "#7a7", "#2a7", "#27a", "#c63", "#a7a", "#aa7", "#7aa", "#999"]
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="%.2f s")
    ax.set_ylabel("seconds (median)")
    ax.set_title(
        f"{doc['rows']:,} rows, scale {doc['scale']}, {doc['cores']} cores: "
        f"copy/{doc['copy_workers']} pipes {doc['copy_vs_parallel_pipe']}, "
        f"lifecycle/{doc['copy_workers']} pipes {doc.get('lifecycle_vs_parallel_pipe')}, "
        f"verify x{doc.get('verify_speedup_vs_reladiff')}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@dataclass(frozen=True)
class Target:
    """A figure's target (the benchmark issues'): its path in the document, the comparison,
    the bound (or how to work it out from the document), and which runs it is set for."""

    name: str
    path: tuple[str, ...]
    op: str  # "<=", ">=" or "<"
    bound: float | Callable[[dict], float]
    where: str = ""
    applies: Callable[[dict], bool] = lambda doc: True


TARGETS = [
    Target("copy_vs_pipe", ("copy_vs_pipe",), "<=", 1.15),
    Target("total_vs_pipe", ("total_vs_pipe",), "<=", 1.6),
    Target("copy_vs_parallel_pipe", ("copy_vs_parallel_pipe",), "<=", 1.05),
    Target("lifecycle_vs_parallel_pipe", ("lifecycle_vs_parallel_pipe",), "<=", 1.3, "the purge in"),
    Target("rollback_vs_copy", ("rollback_vs_copy",), "<=", 1.0),
    Target("purge_vs_copy", ("purge_vs_copy",), "<=", 0.5),
    Target("verify_speedup_vs_reladiff", ("verify_speedup_vs_reladiff",), ">=", 5.0),
    Target("peak_rss_mb", ("peak_rss_mb",), "<=", 300.0),
    # growth as good as linear, within a tenth: 4.4 for scale 4 against 1
    Target("growth_time_ratio", ("growth", "time_ratio"), "<=", lambda d: 1.1 * d["growth"]["rows_ratio"]),
    Target("objects_vs_plain", ("object_copy", "objects_vs_plain"), ">=", 0.9),
    Target("fence_ms_p99", ("live_writes", "fence_ms_p99"), "<", 300.0),
    Target("writer_during_vs_alone_throttled", ("live_writes", "writer_during_vs_alone_throttled"), ">=", 0.6),
    Target("airflow_vs_cli", ("airflow", "airflow_vs_cli"), "<=", 1.15, "at scale 1", lambda d: d.get("scale") == 1),
    Target(
        "airflow_celery_vs_cli",
        ("airflow_celery", "airflow_vs_cli"),
        "<=",
        1.15,
        "at scale 1",
        lambda d: d.get("scale") == 1,
    ),
]

# --airflow-executors: name -> (Airflow's executor, the document's key)
EXECUTORS = {"local": ("LocalExecutor", "airflow"), "celery": ("CeleryExecutor", "airflow_celery")}


def targets(doc: dict) -> dict[str, dict]:
    """Each target this run measured: its value, the target, and whether it was met (None
    where the target is set for another scale)."""
    out: dict[str, dict] = {}
    for t in TARGETS:
        v: object = doc
        for k in t.path:
            v = v.get(k) if isinstance(v, dict) else None
        if not isinstance(v, int | float):
            continue
        b = t.bound(doc) if callable(t.bound) else t.bound
        met = v <= b if t.op == "<=" else v >= b if t.op == ">=" else v < b
        out[t.name] = {
            "value": v,
            "target": f"{t.op} {b:.3g}" + (f" ({t.where})" if t.where else ""),
            "met": met if t.applies(doc) else None,
        }
    return out


def growth(small: dict, large: dict) -> dict:
    """How the copy and verify times and the peak memory grew from the smaller scale to this
    one, both measured in this run: linear growth gives a time ratio equal to the rows ratio."""
    t_small = small["copy_s"] + small["verify_s"]
    t_large = large["copy_s"] + large["verify_s"]
    return {
        "against_scale": small["scale"],
        "rows_ratio": round(large["rows"] / small["rows"], 3),
        "time_ratio": round(t_large / t_small, 3),
        "copy_time_ratio": round(large["copy_s"] / small["copy_s"], 3),
        "verify_time_ratio": round(large["verify_s"] / small["verify_s"], 3),
        "raw_pipe_time_ratio": round(large["raw_pipe_s"] / small["raw_pipe_s"], 3),
        "plan_time_ratio": round(large["plan_s"] / small["plan_s"], 3),
        "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "small": small,
    }


def settle(*dsns: str) -> None:
    for d in dsns:
        with psycopg.connect(d, autocommit=True) as c:
            c.execute("CHECKPOINT")


def truncate(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        c.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")
        c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")


def reset_peak_rss() -> None:
    """Start the process's peak-RSS high-water mark afresh (Linux), so two scales measured
    in one process each get their own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Dataset:
    """One scale's data on its own source and destination servers, and one run of each
    timed step on it."""

    def __init__(self, scale: float, base: Path, batch_users: int):
        self.scale, self.users = scale, max(100, int(500_000 * scale))
        self.settings = server_settings(scale)
        self.cluster = Cluster(["src", "dst"], base, settings=self.settings).start()
        self.src, self.dst = self.cluster["src"].create_database("app"), self.cluster["dst"].create_database("app")
        self.control = self.cluster["src"].create_database("control")
        for d in (self.src, self.dst):
            seed.create_schema(d)
        seed.seed(self.src, self.users)
        spec = yaml.safe_load((ROOT / "migrator/demo/spec.yaml").read_text())
        spec.pop("objects")
        purge = spec.pop("purge")  # only the lifecycle runs purge
        purge["keys"] = {"ie": purge["keys"]["ie"]}
        os.environ.setdefault(purge["keys"]["ie"]["env"], "bench-pseudonym-key-" + "0" * 16)
        self.purge = purge
        spec.pop("evidence")
        spec["policy"] = {c: ("ie" if r != "us" else "us") for c, r in spec["policy"].items()}
        spec["regions"] = {"us": {"dsn": self.src}, "ie": {"dsn": self.dst}}
        spec["control"] = {"dsn": self.control}
        spec["sharding"] = {"shards_per_region": 1}
        spec["copy"] = {"batch_users": batch_users}
        self.spec = spec
        self.codes = [c for c, r in spec["policy"].items() if r == "ie"]
        self.pipe: list[float] = []
        self.ppipe: list[float] = []
        self.upipe: list[float] = []  # the parallel pipe with every trigger at the destination skipped
        self.lives: list[dict[str, float]] = []  # per run: plan, copy, verify, cutover, purge seconds
        self.rollbacks: list[dict[str, float]] = []  # per run: copy and rollback seconds
        self.raw_purges: list[float] = []  # per run: the hand-written purge's seconds
        self.raw_purges_unchecked: list[float] = []  # the same with every trigger at the source skipped
        self.life_pipes: list[float] = []  # per run: the parallel pipe timed beside its lifecycle
        self.planned: list[float] = []
        self.copy: list[float] = []
        self.verify: list[float] = []
        self.rel: list[float] = []
        self.rows = 0
        self.peak_mb = 0.0
        self.plan: Plan | None = None
        self.ctx: Context | None = None

    def reset(self) -> Context:
        truncate(self.dst)
        for d in (self.control, self.src):
            with psycopg.connect(d) as c:
                c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")
        return Context(parse_spec(self.spec))

    def run(self, run: int, with_reladiff: bool) -> None:
        psql = str(bindir() / "psql")
        reset_peak_rss()
        # Rotate which goes first, and checkpoint both servers before each timed step,
        # so none pays for another's writes.
        steps = ["pipe", "parallel pipe", "unchecked pipe", "tool"]
        for step in steps[run % len(steps) :] + steps[: run % len(steps)]:
            ctx = self.reset()
            settle(self.src, self.dst)
            if step == "pipe":
                self.pipe.append(raw_pipe(ctx, psql, self.src, self.dst, "ie"))
                continue
            if step == "parallel pipe":
                self.ppipe.append(parallel_pipe(ctx, psql, self.src, self.dst, "ie", ctx.spec.copy_.workers))
                continue
            if step == "unchecked pipe":
                self.upipe.append(parallel_pipe(ctx, psql, self.src, unchecked(self.dst), "ie", ctx.spec.copy_.workers))
                continue
            t0 = time.perf_counter()
            p = plan(ctx, f"bench-{run}")
            t1 = time.perf_counter()
            for s in p.shards:
                res = copy_shard(ctx, s.shard_id)
                self.rows = sum(res.rows.values())
            self.planned.append(t1 - t0)
            self.copy.append(time.perf_counter() - t1)
        self.ctx = ctx = self.reset()  # the tool's copy again, this time to be verified
        self.plan = p = plan(ctx, f"bench-verify-{run}")
        for s in p.shards:
            copy_shard(ctx, s.shard_id)
        settle(self.src, self.dst)
        t0 = time.perf_counter()
        for s in p.shards:
            assert compare_shard(ctx, s.shard_id).matched
        self.verify.append(time.perf_counter() - t0)
        self.peak_mb = max(self.peak_mb, peak_rss_mb())
        if with_reladiff:
            seconds, found = reladiff(ctx, self.src, self.dst, self.codes)
            assert not found, f"reladiff reports differences on an exact copy: {found[:3]}"
            self.rel.append(seconds)

    def lifecycle(self, run: int, last: str) -> None:
        """The whole life of the shard, each phase timed as `migrator` runs it: plan, copy,
        verify, cutover, then `last` (purge, on a copy of the source made for the run from
        the seeded database; or rollback of the cut-over shard, on the source itself)."""
        from migrator.lifecycle import dispatch

        spec = dict(self.spec, purge=dict(self.purge, after="0s"))
        src = self.src
        self.reset()  # before cloning: an earlier run's guard triggers would slow the hand-written purge
        if last == "purge":
            # the hand-written purge first, on a clone of its own; then once more on another
            # with no trigger (no foreign key) checked
            raw_left = None
            for session, into in ((str, self.raw_purges), (unchecked, self.raw_purges_unchecked)):
                raw = self.clone("app_raw")
                settle(raw, self.dst)
                into.append(raw_purge(session(raw), self.codes))
                now = left(raw)
                assert raw_left in (None, now), "the unchecked hand-written purge did other work"
                raw_left = now
                self.drop("app_raw")
            src = self.clone("app_purge")
            spec["regions"] = dict(spec["regions"], us={"dsn": src})
        ctx = Context(parse_spec(spec))
        if last == "purge":
            # The lifecycle's own yardstick: the parallel pipe on the same source just before
            # it (it cannot go after: the purge changes the source), so both meet the same
            # database at the same hour. A clone starts cold; each table is read once first,
            # so neither the pipe nor the tool after it pays for that alone.
            with psycopg.connect(src) as c:
                for name in ctx.tables:
                    c.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(name)))
            settle(src, self.dst)
            self.life_pipes.append(
                parallel_pipe(ctx, str(bindir() / "psql"), src, self.dst, "ie", ctx.spec.copy_.workers)
            )
            truncate(self.dst)
        settle(src, self.dst)
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        p = plan(ctx, f"life-{last}-{run}")
        times["plan"] = time.perf_counter() - t0
        for phase in ("copy", "verify", "cutover", last):
            t0 = time.perf_counter()
            for s in p.shards:
                dispatch.run_phase(ctx, s.shard_id, phase, reason="benchmark")
            times[phase] = time.perf_counter() - t0
            want = {"copy": "copied", "verify": "verified", "cutover": "cut_over", "purge": "purged"}
            for s in p.shards:
                state = ctx.control.shard(s.shard_id).state.value
                assert state == want.get(phase, "rolled_back"), f"{phase}: shard {s.shard_id} is {state}"
        (self.lives if last == "purge" else self.rollbacks).append(times)
        if last == "purge":
            assert left(src) == raw_left, "the hand-written purge did other work than the tool's"
            self.drop("app_purge")

    def clone(self, name: str) -> str:
        """A copy of the seeded source database, for a run that changes it."""
        with psycopg.connect(self.cluster["src"].dsn(), autocommit=True) as c:
            # cloning needs the template to itself; earlier runs' contexts may keep idle sessions
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'app'")
            c.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(psycopg.sql.Identifier(name)))
            c.execute(
                psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE app STRATEGY FILE_COPY").format(
                    psycopg.sql.Identifier(name)
                )
            )
        return self.cluster["src"].dsn(name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.cluster["src"].dsn(), autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            c.execute(psycopg.sql.SQL("DROP DATABASE {}").format(psycopg.sql.Identifier(name)))

    def life_figures(self) -> dict:
        med = statistics.median
        out: dict = {}
        if self.lives:
            phases = list(self.lives[0])
            out["lifecycle_s"] = {k: round(med(t[k] for t in self.lives), 3) for k in phases}
            out["lifecycle_total_s"] = round(med(sum(t.values()) for t in self.lives), 3)
            # each lifecycle against the parallel pipe timed beside it (same source, same hour)
            pipes = self.life_pipes
            out["lifecycle_parallel_pipe_s"] = round(med(pipes), 3)
            out["lifecycle_vs_parallel_pipe"] = round(med(sum(t.values()) / p for t, p in zip(self.lives, pipes)), 3)
            out["purge_vs_copy"] = round(med(t["purge"] / t["copy"] for t in self.lives), 3)
            # up to the cutover: the lifecycle as it was before there was a purge
            out["lifecycle_to_cutover_vs_parallel_pipe"] = round(
                med(sum(v for k, v in t.items() if k != "purge") / p for t, p in zip(self.lives, pipes)), 3
            )
            out["lifecycle_copy_vs_parallel_pipe"] = round(med(t["copy"] / p for t, p in zip(self.lives, pipes)), 3)
            out["raw_purge_s"] = round(med(self.raw_purges), 3)
            out["purge_vs_raw_purge"] = round(med(t["purge"] for t in self.lives) / med(self.raw_purges), 3)
            # what any tool's lifecycle costs at least: the parallel pipe, then the hand-written purge
            out["pipe_and_raw_purge_vs_parallel_pipe"] = round(
                med((p + r) / p for p, r in zip(pipes, self.raw_purges)), 3
            )
            # and with nothing checked at all, pipes and purge alike, against the checked pipes:
            # the floor of a lifecycle that plans, verifies and cuts over nothing
            out["raw_purge_unchecked_s"] = round(med(self.raw_purges_unchecked), 3)
            if self.upipe:
                out["unchecked_pipe_and_raw_purge_vs_parallel_pipe"] = round(
                    (med(self.upipe) + med(self.raw_purges_unchecked)) / med(self.ppipe), 3
                )
        if self.rollbacks:
            out["rollback_s"] = round(med(t["rollback"] for t in self.rollbacks), 3)
            out["rollback_vs_copy"] = round(med(t["rollback"] / t["copy"] for t in self.rollbacks), 3)
        return out

    def figures(self) -> dict:
        med = statistics.median
        return {
            "scale": self.scale,
            "users": self.users,
            "rows": self.rows,
            "raw_pipe_s": round(med(self.pipe), 3),
            "plan_s": round(med(self.planned), 3),
            "copy_s": round(med(self.copy), 3),
            "verify_s": round(med(self.verify), 3),
            "peak_rss_mb": round(self.peak_mb, 1),
            "copy_vs_pipe": round(med(self.copy) / med(self.pipe), 3),
            "parallel_pipe_s": round(med(self.ppipe), 3),
            "copy_vs_parallel_pipe": round(med(self.copy) / med(self.ppipe), 3),
            "unchecked_parallel_pipe_s": round(med(self.upipe), 3),
            "copy_vs_unchecked_parallel_pipe": round(med(self.copy) / med(self.upipe), 3),
            "total_vs_pipe": round((med(self.copy) + med(self.verify)) / med(self.pipe), 3),
            **(
                {
                    "reladiff_s": round(med(self.rel), 3),
                    "verify_speedup_vs_reladiff": round(med(self.rel) / med(self.verify), 2),
                }
                if self.rel
                else {}
            ),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs of the copy and verify figures; 0 skips them (for --writes, --objects or --airflow alone)",
    )
    ap.add_argument("--batch-users", type=int, default=20000)
    ap.add_argument(
        "--lifecycle-runs",
        type=int,
        default=None,
        help="runs of the whole lifecycle (plan to purge, and plan to rollback); default: --runs",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--objects", type=int, default=500, help="EU users with one object each for the object figure; 0 skips it"
    )
    ap.add_argument("--object-kb", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument(
        "--object-runs",
        type=int,
        default=7,
        help="runs of the object figure (each takes seconds, and S3 request times vary a lot)",
    )
    ap.add_argument("--no-reladiff", action="store_true")
    ap.add_argument("--writes", action="store_true", help="measure the fence window and writer throughput")
    ap.add_argument(
        "--throttle-divisors",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[3, 4],
        help="for --writes: the throttled runs, each shard held to 1/N of its unthrottled copy's rate "
        "(comma-separated N; the headline throttled figure is the last)",
    )
    ap.add_argument("--chart", type=Path, default=None, help="write a PNG chart here")
    ap.add_argument("--airflow", action="store_true", help="also time the plan through the Airflow DAG")
    ap.add_argument(
        "--airflow-runs", type=int, default=3, help="timed runs of the DAG and of the CLI each, for --airflow (medians)"
    )
    ap.add_argument(
        "--airflow-idle-sleep",
        type=float,
        default=None,
        help="the scheduler's scheduler_idle_sleep_time for --airflow (default: the demo's Airflow's)",
    )
    ap.add_argument(
        "--airflow-pool-slots",
        type=int,
        default=None,
        help="for --airflow: the migrator_source pool's slots (default: the cores over 2)",
    )
    ap.add_argument(
        "--airflow-executors",
        default="local,celery",
        help="for --airflow: the executors to measure, of local and celery (two Celery workers, "
        "Debian's redis-server as the broker)",
    )
    ap.add_argument(
        "--airflow-no-preload",
        action="store_true",
        help="for --airflow: no airflow_local_settings preload (each task process imports the migrator itself)",
    )
    ap.add_argument(
        "--against-scale",
        type=float,
        default=None,
        help="also measure this smaller scale, on servers of its own, each run right beside this "
        "scale's, and report how time grew with the data",
    )
    a = ap.parse_args()
    executors = [e.strip() for e in a.airflow_executors.split(",") if e.strip()]
    if not executors or set(executors) - set(EXECUTORS):
        ap.error(f"--airflow-executors: a comma-separated list of {', '.join(EXECUTORS)}")
    if a.airflow and "celery" in executors and shutil.which("redis-server") is None:
        ap.error("--airflow-executors celery needs Debian's redis-server (apt-get install redis-server)")
    if a.lifecycle_runs is None:
        a.lifecycle_runs = a.runs
    if not a.throttle_divisors or min(a.throttle_divisors) < 1:
        ap.error("--throttle-divisors: one or more whole numbers of 1 or more, comma-separated (e.g. 3,4)")
    if a.runs == 0 and (a.against_scale is not None or a.chart or not (a.writes or a.objects or a.airflow)):
        ap.error(
            "--runs 0 skips the copy and verify figures: it needs --writes, --objects or --airflow, "
            "and takes neither --against-scale nor --chart"
        )
    # A terminated run still stops its servers (the `finally` below): a server whose
    # postmaster is gone can leave a backend running its query on and on.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    # when, and how busy the shared machine was as the benchmark began (1, 5 and 15 min)
    started = {
        "measured_at": datetime.now().astimezone().isoformat(timespec="minutes"),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    sets: list[Dataset] = []
    try:
        sets.append(big := Dataset(a.scale, base / "main", a.batch_users))
        if a.against_scale is not None:
            sets.append(small := Dataset(a.against_scale, base / "small", a.batch_users))
        for run in range(a.runs):
            for ds in sets if run % 2 == 0 else sets[::-1]:
                ds.run(run, with_reladiff=not a.no_reladiff)
        src, dst, control, spec, ctx, p = big.src, big.dst, big.control, big.spec, big.ctx, big.plan
        med = statistics.median
        changed = None
        if a.runs and not a.no_reladiff:  # one row changed at the destination: both must find it
            assert ctx is not None and p is not None
            with psycopg.connect(dst, autocommit=True) as c:
                (victim,) = row_of(
                    c,
                    "UPDATE comments SET body = 'changed' WHERE comment_id = (SELECT min(comment_id) FROM comments) "
                    "RETURNING comment_id",
                )
            tool_found = [d.record() for s in p.shards for d in compare_shard(ctx, s.shard_id).differences]
            _, rel_found = reladiff(ctx, src, dst, big.codes)
            changed = {
                "row": {"table": "comments", "comment_id": victim},
                "tool_found": tool_found
                == [{"table": "comments", "pk": {"comment_id": str(victim)}, "problem": "different"}],
                "reladiff_found": sorted(f["sign"] for f in rel_found) == ["+", "-"]
                and all(f["table"] == "comments" and f["key"] == [str(victim)] for f in rel_found),
            }
        # after the changed row: each lifecycle starts from an empty destination
        for run in range(a.lifecycle_runs if a.runs else 0):
            for last in ("purge", "rollback") if run % 2 == 0 else ("rollback", "purge"):
                big.lifecycle(run, last)
        if a.runs:
            assert ctx is not None
            fig = big.figures()
            doc = {
                **{k: fig[k] for k in ("scale", "users", "rows")},
                "runs": a.runs,
                "cores": os.cpu_count(),
                "machine": platform.machine(),
                **started,
                "server_settings": big.settings,
                **{k: fig[k] for k in ("raw_pipe_s", "plan_s", "copy_s", "verify_s")},
                "copy_vs_pipe": round(med(big.copy) / med(big.pipe), 3),
                "total_vs_pipe": round((med(big.copy) + med(big.verify)) / med(big.pipe), 3),
                "plan_copy_verify_vs_pipe": round(
                    (med(big.planned) + med(big.copy) + med(big.verify)) / med(big.pipe), 3
                ),
                "parallel_pipe_s": fig["parallel_pipe_s"],
                "copy_workers": ctx.spec.copy_.workers,
                "copy_vs_parallel_pipe": fig["copy_vs_parallel_pipe"],
                # the same pipes with every destination trigger skipped, checks and all: a floor
                # no tool may reach by skipping triggers it does not know (migrator/replica.py)
                "unchecked_parallel_pipe_s": fig["unchecked_parallel_pipe_s"],
                "copy_vs_unchecked_parallel_pipe": fig["copy_vs_unchecked_parallel_pipe"],
                **big.life_figures(),
                "peak_rss_mb": fig["peak_rss_mb"],
                "reladiff_s": round(med(big.rel), 3) if big.rel else None,
                "verify_speedup_vs_reladiff": round(med(big.rel) / med(big.verify), 2) if big.rel else None,
                "changed_row": changed,
                "note": "plan_s is `migrator plan` (membership, directory rows, row estimates), timed apart from "
                "the copy phase copy_s; peak_rss_mb is the benchmark process's (the tool runs in it) over this "
                "scale's plan, copy and verify runs",
            }
        else:  # only the figures asked for, on this scale's data
            doc = {
                "scale": big.scale,
                "users": big.users,
                "runs": 0,
                "cores": os.cpu_count(),
                "machine": platform.machine(),
                **started,
                "server_settings": big.settings,
            }
        if a.against_scale is not None:
            doc["growth"] = growth(small.figures(), fig)
        if a.writes:
            doc["live_writes"] = bench_writes(a, src, dst, control, spec)
        if a.objects:
            doc["object_copy"] = bench_objects(a, src, control, spec, a.object_runs)
        for name in executors if a.airflow else []:
            doc[EXECUTORS[name][1]] = bench_airflow(
                big.cluster,
                dst,
                control,
                spec,
                base / name,
                a.airflow_runs,
                a.airflow_idle_sleep,
                not a.airflow_no_preload,
                a.airflow_pool_slots,
                EXECUTORS[name][0],
            )
        doc["targets"] = targets(doc)
        if a.chart:
            chart(doc, a.chart)
        print(json.dumps(doc, indent=2) if a.json else "\n".join(f"{k}: {v}" for k, v in doc.items()))
    finally:
        for ds in sets:
            ds.cluster.remove()


if __name__ == "__main__":
    main()
