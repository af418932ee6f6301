"""Verification of a shard: what it guarantees, and when it runs.

`verify_shard` runs after the copy and before cutover (and again whenever asked, e.g. by
an auditor). It guarantees that, at the moment each side was read, the multiset of the
shard's users' rows in every table is the same at the source and the destination: each
side computes, in one pass per table inside its own database, (count, sum of canonical
row hashes) per batch of users (see `sqlgen` for the digest). The two sides are read
concurrently, each on `verify.workers` connections sharing out the tables. Any batch
that differs is narrowed to rows by comparing (primary key, row hash) lists of just that
batch, so the report names the table and primary keys of every differing row -- never a
row's contents. The source's reads hold back as the copy's do (`copy.throttle`, checked
before each table; see `throttle`). The shard digest is a SHA-256 over the per-batch
aggregates and is stored with the shard's state for the evidence trail.
"""

from __future__ import annotations

import queue
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from migrator import capture, metrics
from migrator.control.context import Context
from migrator.control.state import State
from migrator.differences import Difference, RowDifference
from migrator.errors import ChecksumMismatch, StateConflict
from migrator.phases import verify_objects
from migrator.shard import objects
from migrator.shard.compare import not_changed_since
from migrator.shard.digest import aggregate, largest_first, shard_digest
from migrator.stores import sqlgen
from migrator.stores.postgres import connect
from migrator.throttle import Throttle

MAX_NAMED = 1000


@dataclass(frozen=True)
class VerifyResult:
    matched: bool
    digest: str
    rows: Mapping[str, int]
    differences: tuple[Difference, ...]
    objects_listed: str | None = None  # how the source's objects were listed (`verify_objects.verify`)


def _narrow(ctx: Context, src_dsn: str, dst_dsn: str, table_name: str, keys: list[str]) -> list[RowDifference]:
    """Name the rows of one batch and table that differ, by primary key."""
    table = ctx.tables[table_name]
    q = sqlgen.pk_hashes(ctx.spec.entity_graph, table, ctx.key_type)
    sides = []
    for dsn in (src_dsn, dst_dsn):
        with connect(dsn, autocommit=True, keyed=True) as c:
            sides.append({tuple(r[:-1]): r[-1] for r in c.execute(q, sqlgen.keys_arg(keys)).fetchall()})
    src, dst = sides
    diffs = []
    for pk in sorted(src.keys() | dst.keys()):
        if pk not in dst:
            problem = "missing at destination"
        elif pk not in src:
            problem = "extra at destination"
        elif src[pk] != dst[pk]:
            problem = "different"
        else:
            continue
        diffs.append(RowDifference.of(table_name, table.pk, pk, problem))
    return diffs


def compare_shard(ctx: Context, sid: str, in_flight_ok: bool = False) -> VerifyResult:
    """Compare both sides. With `in_flight_ok`, rows whose keys are in the shard's change
    log (being caught up while the application writes) are not counted as differences:
    they are re-checked, exactly, inside the cutover fence."""
    ctl = ctx.control
    shard = ctl.shard(sid)
    ctx.check_destination(shard.region)
    batches = ctl.batch_keys(sid, ctx.sort_keys)
    src_dsn, dst_dsn = ctx.origin_dsn(shard), ctx.dsn(shard.region)
    # Each side is read on `verify.workers` connections at once, each taking the next
    # table from the side's queue, so neither side's server waits on its slower half.
    est = shard.plan.get("rows", {})
    order = largest_first(ctx, list(ctx.tables), est)
    n = max(1, min(ctx.spec.verify.workers, len(order)))
    work: dict[str, queue.SimpleQueue[str]] = {side: queue.SimpleQueue() for side in ("src", "dst")}
    for side in work:
        for t in order:
            work[side].put(t)
    src: dict[tuple[str, int], tuple[int, str]] = {}
    dst: dict[tuple[str, int], tuple[int, str]] = {}
    throttle = Throttle(ctx, sid, "verify")  # the source's reads hold back as the copy's do
    with ThreadPoolExecutor(max_workers=2 * n) as pool:
        fs = [pool.submit(aggregate, ctx, src_dsn, sid, work["src"], shard.users, est, throttle) for _ in range(n)]
        fd = [pool.submit(aggregate, ctx, dst_dsn, sid, work["dst"], shard.users, est) for _ in range(n)]
        for f in fs:
            src.update(f.result())
        for f in fd:
            dst.update(f.result())
    differences: list[Difference] = []
    objects_listed = None
    if objects.enabled(ctx):
        obj_agg, obj_diffs, objects_listed = verify_objects.verify(ctx, sid, shard.region, ctx.origin(shard), batches)
        src.update(obj_agg)
        dst.update(obj_agg)
        differences += obj_diffs
    for table, b in sorted(src.keys() | dst.keys()):
        if src.get((table, b)) != dst.get((table, b)) and len(differences) < MAX_NAMED:
            differences += _narrow(ctx, src_dsn, dst_dsn, table, batches[b])
    if in_flight_ok and differences:
        differences = not_changed_since(differences, capture.touched(src_dsn, sid))
    rows: dict[str, int] = {t: 0 for t in ctx.tables}
    for (t, _), (n, _) in src.items():
        rows[t] = rows.get(t, 0) + n
    matched = (src == dst or in_flight_ok) and not differences
    return VerifyResult(
        matched, shard_digest(src if matched else dst), rows, tuple(differences[:MAX_NAMED]), objects_listed
    )


def verify_shard(ctx: Context, sid: str) -> VerifyResult:
    """Verify a copied shard and record the outcome; a verified or cut-over shard is re-checked
    without changing its phase unless it no longer matches before cutover."""
    ctl = ctx.control
    shard = ctl.shard(sid)
    if shard.state not in (State.COPIED, State.VERIFIED, State.CUT_OVER):
        raise StateConflict(f"shard {sid} is {shard.state}; only a copied shard can be verified")
    if ctx.spec.changes.capture and shard.state == State.COPIED:
        shard_region = ctx.dsn(shard.region)
        # Rows still changing are left out of the comparison (in_flight_ok) and compared
        # at cutover, so the catch-up need not reach an empty log: under a writer that
        # never pauses it would not.
        capture.catch_up(
            ctx, sid, ctx.origin_dsn(shard), shard_region, "forward", pending_at_most=ctx.spec.changes.catch_up_below
        )
    res = compare_shard(ctx, sid, in_flight_ok=ctx.spec.changes.capture and shard.state != State.CUT_OVER)
    detail = {
        "event": "verify",
        "matched": res.matched,
        "digest": res.digest,
        "rows": res.rows,
        "differences": len(res.differences),
        **({"objects_listed": res.objects_listed} if res.objects_listed else {}),
    }
    # the state machine keeps the outcome (what an approver is shown); an earlier answer to
    # the cutover was given for what the verify before showed, so it is asked again
    kept = {"last_verify": {k: v for k, v in detail.items() if k != "event"}, "approval": None}
    if res.matched:
        if shard.state == State.COPIED:
            ctl.move(sid, State.COPIED, State.VERIFIED, detail, digest=res.digest, **kept)
        else:
            ctl.keep(sid, detail, **kept)
        return res
    named = "; ".join(d.named() for d in res.differences[:10])
    more = f" (+{len(res.differences) - 10} more)" if len(res.differences) > 10 else ""
    metrics.mismatched(sid, shard.region, len(res.differences))
    msg = f"shard {sid}: {len(res.differences)} row(s) differ between source and destination: {named}{more}"
    ctl.keep(sid, detail, **kept)  # the move to failed, where allowed, is `dispatch`'s
    raise ChecksumMismatch(msg, res.differences)
