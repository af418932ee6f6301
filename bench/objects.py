"""The object copy against a plain boto3 GET/PUT loop with the same threads."""

from __future__ import annotations

import os
import statistics
import time

import psycopg

from bench.floors import row_of
from migrator.control.context import Context
from migrator.phases.plan import plan
from migrator.spec import parse_spec


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
