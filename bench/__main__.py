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


def bench_objects(a, src_db: str, control: str, spec: dict, runs: int) -> dict:
    """objects/s and MB/s of the tool's object copy against a plain boto3 GET/PUT loop with
    the same thread count, between two S3 endpoints (moto servers) started here."""
    import boto3
    from concurrent.futures import ThreadPoolExecutor

    from migrator import objects
    from migrator.embedded import LocalS3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    servers = {r: LocalS3(r).start() for r in ("us", "ie")}
    try:
        cl = {r: boto3.client("s3", endpoint_url=s.endpoint, region_name="us-east-1") for r, s in servers.items()}
        cl["us"].create_bucket(Bucket="media-us")
        with psycopg.connect(src_db) as c:
            eu = [u for (u,) in c.execute(
                "SELECT user_id FROM users WHERE country_code = ANY(%s) ORDER BY user_id LIMIT %s",
                ([k for k, r in spec["policy"].items() if r != "us"], a.objects))]
        body = os.urandom(a.object_kb * 1024)
        keys = [f"users/{u}/media.bin" for u in eu]
        with ThreadPoolExecutor(a.threads) as pool:
            list(pool.map(lambda k: cl["us"].put_object(Bucket="media-us", Key=k, Body=body), keys))
        ospec = dict(spec, objects={"user_prefix": "users/{user}/", "threads": a.threads,
                                    "stores": {"us": {"endpoint": servers["us"].endpoint, "bucket": "media-us"},
                                               "ie": {"endpoint": servers["ie"].endpoint, "bucket": "media-ie"}}})
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
            p = plan(ctx, f"objects-{run}")
            t0 = time.perf_counter()
            for s in p.shards:
                res = objects.copy_batches(ctx, s.shard_id, s.region, ctx.control.batch_keys(s.shard_id))
                assert res["copied"] > 0
            tool.append(time.perf_counter() - t0)
        med = statistics.median
        mb = len(keys) * a.object_kb / 1024
        return {
            "objects": len(keys), "object_kb": a.object_kb, "threads": a.threads,
            "plain_loop_s": round(med(plain), 3), "tool_objects_s": round(med(tool), 3),
            "tool_objects_per_s": round(len(keys) / med(tool), 1), "tool_mb_per_s": round(mb / med(tool), 2),
            "plain_objects_per_s": round(len(keys) / med(plain), 1),
            "objects_vs_plain": round(med(plain) / med(tool), 3),
        }
    finally:
        for srv in servers.values():
            srv.stop()


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
    ap.add_argument("--objects", type=int, default=500, help="EU users with one object each for the object figure; 0 skips it")
    ap.add_argument("--object-kb", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8)
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
            "note": "copy_s includes planning; reladiff and fence figures are not measured yet",
        }
        if a.objects:
            doc["object_copy"] = bench_objects(a, src, control, spec, a.runs)
        print(json.dumps(doc, indent=2) if a.json else "\n".join(f"{k}: {v}" for k, v in doc.items()))
    finally:
        cluster.remove()


if __name__ == "__main__":
    main()
