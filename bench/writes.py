"""An application writer during a migration: the fence window and the writer's throughput
against the writer alone."""

from __future__ import annotations

import statistics
import time

import psycopg

from bench.dataset import truncate
from bench.floors import row_of
from migrator.control.context import Context
from migrator.phases.plan import plan
from migrator.spec import parse_spec


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
    shards spent copying, summed). The headline throttled figures are the last setting's.
    `dst` is the destination as its own application reaches it (beside it); the migrator
    reaches it as `spec` says."""
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
