"""Undoes a shard from any phase; running it twice is harmless.

Before cutover it removes exactly the shard's users' rows from the destination (children
first, one transaction per batch, each with its ledger row). After cutover it first
flips the directory back to the source (epoch + 1, in the same transaction as the move to
rolling_back), so no user is ever homed where their rows are being deleted.
"""
from __future__ import annotations

from migrator import objects, sqlgen
from migrator.context import Context
from migrator.control import SCHEMA
from migrator.copier import ensure_ledger
from migrator.errors import retrying
from migrator.state import Phase
from migrator.stores.postgres import connect


def rollback_shard(ctx: Context, sid: str, reason: str = "") -> dict:
    ctl = ctx.control
    shard = ctl.shard(sid)
    if shard.state == Phase.ROLLED_BACK:
        return {"shard_id": sid, "already": True, "deleted": {}}
    flipped = 0
    with ctl.connect() as c:
        if shard.state == Phase.CUT_OVER:
            flipped = c.execute(
                f"UPDATE {SCHEMA}.directory d SET home = %s, epoch = d.epoch + 1, updated_at = now() "
                f"FROM {SCHEMA}.shard_user su WHERE su.shard_id = %s AND su.user_key = d.user_key AND d.home = %s",
                (ctx.spec.source_region, sid, shard.region),
            ).rowcount
        ctl.transition(c, sid, shard.state, Phase.ROLLING_BACK,
                       {"event": "rollback started", "reason": reason, "directory_flipped_back": flipped})
    graph, kt = ctx.spec.entity_graph, ctx.key_type
    dst = ctx.dsn(shard.region)
    deleted = {t: 0 for t in ctx.tables}
    for attempt in retrying(ctx.spec.retry):
        with attempt:
            ensure_ledger(dst)
    removed_objects = objects.rollback(ctx, sid, shard.region)
    for b, keys in sorted(ctl.batch_keys(sid).items()):
        for attempt in retrying(ctx.spec.retry):
            with attempt, connect(dst) as c:
                counts = {}
                # Only batches this tool wrote (their ledger row) are removed: rows that were
                # there before, which the copy refused as a conflict, are not the shard's.
                ours = c.execute(
                    "DELETE FROM migrator.batch_ledger WHERE shard_id = %s AND batch_no = %s RETURNING 1", (sid, b)
                ).fetchone()
                if ours:
                    for name in reversed(list(ctx.tables)):
                        counts[name] = c.execute(sqlgen.delete_keys(graph, ctx.tables[name], kt), {"keys": keys}).rowcount
        for t, n in counts.items():
            deleted[t] += n
    with ctl.connect() as c:
        ctl.clear_checkpoints(c, sid)
        ctl.transition(c, sid, Phase.ROLLING_BACK, Phase.ROLLED_BACK,
                       {"event": "rolled back", "reason": reason, "deleted": deleted, "objects_deleted": removed_objects}, digest=None)
    return {"shard_id": sid, "already": False, "deleted": deleted, "objects_deleted": removed_objects,
            "directory_flipped_back": flipped}
