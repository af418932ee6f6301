"""`python -m bench --scale S --json`: the tool's phases against peers and floors, in one run.

Source and destination are separate PostgreSQL servers started here (`dataset`); the
destination is truncated between runs; each figure is the median of --runs runs:
* copy against the raw `psql \\copy ... (FORMAT binary)` pipe per table, alone, in parallel
  and with the destination's triggers skipped (`floors`; planning is timed apart: the pipe
  has no counterpart to it);
* verify against reladiff (-j 4) on the same tables, and once more with one row changed
  at the destination, which both must find (`peers`);
* the lifecycle to cutover against the unchecked pipe plus one pass of checksums on both
  sides, the purge against a hand-written one with the same lanes and recheck (`floors`);
* object copy against a plain boto3 GET/PUT loop with the same threads (`objects`);
* with --writes: the fence window (p50/p99 over shards) and a writer's throughput during a
  migration against without one (`writes`);
* with --airflow: the plan through the DAG against the CLI (`under_airflow`);
* with --rtt-ms 80: all of it with the destination behind a relay holding each direction
  for half of that round trip (with --workers-at destination, the source and the control
  database behind it instead: the tool's workers in the destination's region).
It prints one JSON document with each figure's target (`targets`) and writes a PNG chart
(--chart, `chart`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import psycopg

from bench.chart import chart
from bench.dataset import Dataset
from bench.floors import row_of
from bench.objects import bench_objects
from bench.peers import reladiff
from bench.targets import growth, targets
from bench.under_airflow import EXECUTORS, bench_airflow
from bench.writes import bench_writes
from migrator.phases.verify import compare_shard


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
        "--rtt-ms",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.0],
        help="the destination this far away: a relay on loopback holds each direction for half of it "
        "(0, the default: loopback); several, comma-separated (e.g. 0,80), measure the copy, verify "
        "and lifecycle figures over each link on servers of their own, each run beside the others, "
        "the first link's in the document's top level, the others' under `links`",
    )
    ap.add_argument(
        "--workers-at",
        choices=["source", "destination"],
        default="source",
        help="with --rtt-ms: where the tool's workers run, beside the source and its control database "
        "(the destination across the link; the default) or in the destination's region (the source and "
        "the control database across it)",
    )
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
    if min(a.rtt_ms) < 0 or len(set(a.rtt_ms)) != len(a.rtt_ms):
        ap.error("--rtt-ms: round trips of 0 or more, each once, comma-separated (e.g. 0,80)")
    if len(a.rtt_ms) > 1 and (a.runs == 0 or a.against_scale is not None):
        ap.error(
            "--rtt-ms with several links measures the copy, verify and lifecycle: it needs --runs, not --against-scale"
        )
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
        "rtt_ms": a.rtt_ms[0],  # the round trip through the relay (0: loopback)
        "workers_at": a.workers_at,  # which side of it the tool's workers run on
    }
    sets: list[Dataset] = []
    try:
        sets.append(big := Dataset(a.scale, base / "main", a.batch_users, a.rtt_ms[0], a.workers_at))
        links = {rtt: Dataset(a.scale, base / f"rtt{rtt:g}", a.batch_users, rtt, a.workers_at) for rtt in a.rtt_ms[1:]}
        sets.extend(links.values())
        if a.against_scale is not None:
            sets.append(small := Dataset(a.against_scale, base / "small", a.batch_users, a.rtt_ms[0], a.workers_at))
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
                for ds in [big, *links.values()] if run % 2 == 0 else [*links.values(), big]:
                    ds.lifecycle(run, last)
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
                **_over_the_link(big, ctx.spec.copy_.workers),
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
        if links:
            # the same figures over each other link, its servers and runs beside the first's
            assert ctx is not None
            doc["links"] = {}
            for rtt, ds in links.items():
                at = {"rtt_ms": rtt, **_over_the_link(ds, ctx.spec.copy_.workers)}
                doc["links"][f"{rtt:g}"] = {**at, "targets": targets(at)}
        if a.against_scale is not None:
            doc["growth"] = growth(small.figures(), fig)
        if a.writes:
            # the application writes beside each server; the migrator reaches the destination
            # as the spec says (across the relay with --rtt-ms)
            doc["live_writes"] = bench_writes(a, big.src_near, big.dst_near, big.control_near, spec)
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
            if ds.relay is not None:
                ds.relay.stop()
            ds.cluster.remove()


def _over_the_link(ds: Dataset, workers: int) -> dict:
    """The copy, verify and lifecycle figures of one dataset (one link) against its floors."""
    med = statistics.median
    fig = ds.figures()
    return {
        **{k: fig[k] for k in ("raw_pipe_s", "plan_s", "copy_s", "verify_s")},
        "copy_vs_pipe": round(med(ds.copy) / med(ds.pipe), 3),
        "total_vs_pipe": round((med(ds.copy) + med(ds.verify)) / med(ds.pipe), 3),
        "plan_copy_verify_vs_pipe": round((med(ds.planned) + med(ds.copy) + med(ds.verify)) / med(ds.pipe), 3),
        "parallel_pipe_s": fig["parallel_pipe_s"],
        "copy_workers": workers,
        "copy_vs_parallel_pipe": fig["copy_vs_parallel_pipe"],
        # the same pipes with every destination trigger skipped, checks and all: a floor no
        # tool may reach by skipping triggers it does not know (migrator/replica.py)
        "unchecked_parallel_pipe_s": fig["unchecked_parallel_pipe_s"],
        "copy_vs_unchecked_parallel_pipe": fig["copy_vs_unchecked_parallel_pipe"],
        **ds.life_figures(),
        "peak_rss_mb": fig["peak_rss_mb"],
    }


if __name__ == "__main__":
    main()
