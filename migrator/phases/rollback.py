"""Undoes a shard from any phase; running it twice is harmless.

Before cutover it removes exactly the shard's users' rows from the destination (children
first, one transaction per batch, each with its ledger row). After cutover it first
flips the directory back to the shard's origin (epoch + 1, in the same transaction as the move to
rolling_back), so no user is ever homed where their rows are being deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from psycopg import ClientCursor, sql

from migrator import capture, hooks
from migrator.capture import recovery
from migrator.capture.watchdog import watching
from migrator.control import directory
from migrator.control.context import Context
from migrator.control.state import State
from migrator.errors import ChecksumMismatch, StateConflict, describe
from migrator.lanes import in_lanes
from migrator.phases import rollback_objects
from migrator.schema import history
from migrator.shard.compare import compare_touched
from migrator.stores import replica, sqlgen
from migrator.stores.postgres import Conn, bounded, connect, send

log = logging.getLogger("migrator.phases.rollback")


@dataclass(frozen=True)
class RollbackResult:
    """What a rollback removed from the destination (nothing when it had already ended)."""

    already: bool
    deleted: Mapping[str, int] = field(default_factory=dict)  # rows per table
    objects_deleted: int = 0
    directory_flipped_back: int = 0  # users homed at the source again


def _carry_back(ctx: Context, sid: str, src: str, dst: str) -> int:
    """Fence the destination, carry every destination write since cutover back to the
    source and verify; ends with the decision to roll back (the destination fence held),
    before the directory flips back: a rollback loses nothing."""
    deadline = time.monotonic() + max(ctx.spec.changes.fence_window_s, 30.0)
    capture.install(ctx, dst)  # the guards at their current rules (the lasting guard it leaves included)
    try:
        capture.stage_fence(dst, sid, ctx.control)
        with bounded(deadline):
            capture.fence(dst, sid, deadline)
            n = capture.catch_up(ctx, sid, dst, src, "reverse", deadline=deadline)
            diffs = compare_touched(ctx, sid, log_at=dst, origin=src, destination=dst)
            if diffs:
                raise ChecksumMismatch(f"shard {sid}: {len(diffs)} row(s) differ after carrying writes back", diffs)
            if time.monotonic() > deadline:
                raise TimeoutError("rollback's fence window exceeded")
            capture.hold_fence(dst, sid)  # until the rows are gone from the destination
        return n
    except BaseException:
        capture.lift(dst, sid)  # the shard stays cut over and writable at its new home
        raise


def _undo_cutover(ctx: Context, sid: str, region: str, origin: str, reason: str) -> tuple[int, int]:
    """Carry the writes back, then flip the directory back and lift the fence at the origin;
    a failure after the decision is finished by recovery. (changes carried, users flipped)"""
    src, dst = ctx.dsn(origin), ctx.dsn(region)
    ctx.control.keep(sid, {"event": recovery.ROLLBACK_REQUESTED, "reason": reason}, rollback_reason=reason)
    with watching(ctx, sid):
        carried = _carry_back(ctx, sid, src, dst)
        try:
            hooks.point("rollback held", ctx, sid)
            flipped = directory.flip_back(
                ctx,
                sid,
                State.CUT_OVER,
                region,
                origin,
                {"event": "rollback started", "reason": reason, "changes_carried_back": carried},
            )
            capture.lift(src, sid)  # the users are homed at their origin again: let them write there
        except BaseException as exc:
            try:  # once: if this fails too, the watchdog and the phase's rerun (which resolves first) do
                recovery.resolve_shard(ctx, ctx.control.shard(sid))
            except Exception as again:  # noqa: BLE001 - the first failure is the one raised
                log.error(
                    "shard %s: rollback interrupted (%s), not resolved yet (%s)", sid, describe(exc), describe(again)
                )
            raise
    return carried, flipped


def _delete_batch(ctx: Context, sid: str, c: Conn, b: int, keys: list[str], rep: replica.Replica) -> dict[str, int]:
    """Remove one batch's rows from the destination (on the lane's connection `c`), children
    first, with its ledger row: one message, one round trip to a destination that may be an
    ocean away. Only a batch this tool wrote (its ledger row) is removed: rows that were
    there before, which the copy refused as a conflict, are not the shard's."""
    graph, kt = ctx.spec.entity_graph, ctx.key_type
    ours = sql.SQL(" AND current_setting('migrator.ours')::int > 0")
    parts: list[sql.Composable] = [
        sql.SQL("BEGIN"),
        sql.SQL(capture.APPLY),  # through the destination's fence
        sql.SQL(
            "WITH d AS (DELETE FROM migrator.batch_ledger WHERE shard_id = {} AND batch_no = {} RETURNING 1) "
            "SELECT set_config('migrator.ours', count(*)::text, true) FROM d"
        ).format(sql.Literal(sid), sql.Literal(b)),
    ]
    names = list(reversed(list(ctx.tables)))
    for name in names:
        skip = replica.skips_table(rep, name)
        if skip is not None:
            parts.append(replica.skipping_sql(skip))
        parts.append(sqlgen.delete_keys(graph, ctx.tables[name], kt) + ours)
    parts.append(sql.SQL("COMMIT"))
    message = ClientCursor(c).mogrify(sql.SQL("; ").join(parts).as_string(c), sqlgen.keys_arg(keys))
    deleted = [said.rowcount for said in send(c, message) if said.status.startswith("DELETE") and said.rows is None]
    return dict(zip(names, deleted, strict=True))


def rollback_shard(ctx: Context, sid: str, reason: str = "") -> RollbackResult:
    ctl = ctx.control
    shard = ctl.shard(sid)
    if shard.state == State.ROLLED_BACK:
        return RollbackResult(already=True)
    flipped = carried = 0
    if shard.state == State.CUT_OVER and (later := ctl.moved_on(sid)):
        raise StateConflict(
            f"shard {sid}: some of its users were moved on from {shard.region} by {', '.join(later)}, whose "
            "capture took their writes there: a rollback could not carry them all back, so it is refused"
        )
    src, dst = ctx.origin_dsn(shard), ctx.dsn(shard.region)
    if shard.state == State.CUT_OVER and ctx.spec.changes.capture:
        if shard.finalized:
            raise StateConflict(
                f"shard {sid} was finalized: writes at its new home are no longer captured, "
                "so a rollback could lose them"
            )
        carried, flipped = _undo_cutover(ctx, sid, shard.region, ctx.origin(shard), reason)
    else:
        flipped = directory.flip_back(
            ctx, sid, shard.state, shard.region, ctx.origin(shard), {"event": "rollback started", "reason": reason}
        )
    capture.lift(src, sid)  # the users are homed at their origin again: let them write there
    deleted = {t: 0 for t in ctx.tables}
    history.ensure(dst, history.LEDGER)
    rep = replica.of(dst, ctx.spec.entity_graph, f"destination {shard.region}", ctx.spec.copy_.skip_edge_checks)
    removed_objects = rollback_objects.rollback(ctx, sid, shard.region, ctx.origin(shard))
    batches = ctl.batch_keys(sid, ctx.sort_keys)  # one batch's keys at a time
    # Batches hold disjoint users, each deleted in its own transaction: lanes as the copy's.
    for _, counts in in_lanes(
        batches,
        lambda c, b: _delete_batch(ctx, sid, c, b, batches[b], rep),
        ctx.spec.copy_.workers,
        "rollback",
        setup=lambda: connect(dst, keyed=True, autocommit=True),
        teardown=lambda c: c.close(),
    ):
        for t, n in counts.items():
            deleted[t] += n
    hooks.point("departing", ctx, sid)
    if ctx.spec.changes.capture:
        # the users left the destination: it keeps refusing their writes (the rollback's
        # fence, still held, hands over to the lasting guard)
        capture.depart(dst, sid)
    for dsn in (src, dst):
        capture.stop_capture(ctx, dsn, sid, fence_too=True)
    with ctl.connect() as c:
        ctl.clear_checkpoints(c, sid)
        ctl.clear_positions(c, sid)
        held = ctl.hold(c, sid, reason)
        ctl.transition(
            c,
            sid,
            State.ROLLING_BACK,
            State.ROLLED_BACK,
            {
                "event": "rolled back",
                "reason": reason,
                "deleted": deleted,
                "objects_deleted": removed_objects,
                "users_held": held,
            },
            digest=None,
        )
    return RollbackResult(False, deleted, removed_objects, flipped)
