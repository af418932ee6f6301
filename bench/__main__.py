"""`python -m bench --scale S --json`: copy and verify against the raw psql binary pipe.

Source and destination are separate PostgreSQL servers started here; the destination is
truncated between runs; each figure is the median of --runs runs. Not yet measured here:
reladiff, objects, fence windows (see the benchmark issue).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
import yaml

from migrator import sqlgen
from migrator.context import Context
from migrator.copier import copy_shard
from migrator.demo import seed
from migrator.embedded import Cluster, bindir
from migrator.planner import plan
from migrator.spec import parse_spec
from migrator.verifier import compare_shard

ROOT = Path(__file__).resolve().parent.parent
TABLES = ["users", "videos", "comments", "login_events", "devices"]


def raw_pipe(ctx: Context, psql: str, src: str, dst: str, region: str) -> float:
    codes = [c for c, r in ctx.spec.policy.items() if r == region]
    t0 = time.perf_counter()
    for name, table in ctx.tables.items():
        own = sqlgen.ownership(ctx.spec.entity_graph, name)
        q = psycopg.sql.SQL("SELECT t0.* FROM {} WHERE {} IN (SELECT user_id FROM users WHERE country_code = ANY({}))").format(
            own.from_, own.owner, psycopg.sql.Literal(codes))
        with psycopg.connect(src) as c:
            text = q.as_string(c)
        cmd = (f"{psql} '{src}' -qc \"\\copy ({text}) TO STDOUT (FORMAT binary)\" | "
               f"{psql} '{dst}' -qc \"\\copy {name} FROM STDIN (FORMAT binary)\"")
        subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)
    return time.perf_counter() - t0


def truncate(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        c.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")
        c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-users", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    users = max(100, int(500_000 * a.scale))
    base = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    cluster = Cluster(["src", "dst"], base).start()
    try:
        src, dst = cluster["src"].create_database("app"), cluster["dst"].create_database("app")
        control = cluster["src"].create_database("control")
        for d in (src, dst):
            seed.create_schema(d)
        seed.seed(src, users)
        spec = yaml.safe_load((ROOT / "migrator/demo/spec.yaml").read_text())
        spec.pop("objects")
        spec["policy"] = {c: ("ie" if r != "us" else "us") for c, r in spec["policy"].items()}
        spec["regions"] = {"us": {"dsn": src}, "ie": {"dsn": dst}}
        spec["control"] = {"dsn": control}
        spec["sharding"] = {"shards_per_region": 1}
        spec["copy"] = {"batch_users": a.batch_users}
        psql = str(bindir() / "psql")
        pipe, copy, verify = [], [], []
        rows = 0
        peak = 0
        proc = psutil.Process()
        for run in range(a.runs):
            truncate(dst)
            ctx = Context(parse_spec(spec))
            pipe.append(raw_pipe(ctx, psql, src, dst, "ie"))
            truncate(dst)
            with psycopg.connect(control) as c:
                c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")
            ctx = Context(parse_spec(spec))
            t0 = time.perf_counter()
            p = plan(ctx, f"bench-{run}")
            for s in p.shards:
                res = copy_shard(ctx, s.shard_id)
                rows = sum(res.rows.values())
            copy.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for s in p.shards:
                assert compare_shard(ctx, s.shard_id).matched
            verify.append(time.perf_counter() - t0)
            peak = max(peak, proc.memory_info().rss)
        med = statistics.median
        doc = {
            "scale": a.scale, "users": users, "rows": rows, "runs": a.runs, "cores": os.cpu_count(),
            "machine": platform.machine(),
            "raw_pipe_s": round(med(pipe), 3), "copy_s": round(med(copy), 3), "verify_s": round(med(verify), 3),
            "copy_vs_pipe": round(med(copy) / med(pipe), 3),
            "total_vs_pipe": round((med(copy) + med(verify)) / med(pipe), 3),
            "peak_rss_mb": round(peak / 2**20, 1),
            "note": "copy_s includes planning; reladiff, objects and fence figures are not measured yet",
        }
        print(json.dumps(doc, indent=2) if a.json else "\n".join(f"{k}: {v}" for k, v in doc.items()))
    finally:
        cluster.remove()


if __name__ == "__main__":
    main()
