"""Hands a verified shard's users to their new region in the ownership directory.

The check that the shard is verified and the flip of every user's home (epoch + 1) are
one transaction in the control database: a shard that was not verified, or whose users
are no longer all at the source, cannot be cut over, and a half-flipped shard cannot exist.
With change capture that transaction updates the directory before the write fence goes up
and commits as the fence window's last step, so the users' write downtime does not grow
with their number. The source rows stay until a later purge.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, closing, nullcontext

from migrator import capture, hooks, metrics
from migrator.capture import recovery
from migrator.capture.watchdog import watching
from migrator.control import directory
from migrator.control.context import Context
from migrator.control.state import State
from migrator.errors import ChecksumMismatch, StateConflict, TransientError, describe
from migrator.shard.compare import compare_touched, not_changed_since
from migrator.shard.digest import CopyDigest, digest_copy
from migrator.shard.window import settle
from migrator.stores.postgres import Conn, bounded

log = logging.getLogger("migrator.phases.cutover")


class FenceWindowExceeded(TransientError):
    """The fenced part of a cutover did not finish in its window: the fence was lifted and
    the shard stays on the source; cutover is retried later."""


def cutover_shard(ctx: Context, sid: str) -> int:
    """Cut the shard over; with change capture, inside a bounded write fence."""
    if not ctx.spec.changes.capture:
        ctx.check_unnamed_tables()
        flipped = directory.flip(ctx, sid, {})
        keep_frozen(ctx, sid)
        return flipped
    ctl = ctx.control
    shard = ctl.shard(sid)
    if shard.state != State.VERIFIED:
        raise StateConflict(f"shard {sid} is {shard.state}; only a verified shard can be cut over")
    ctx.check_unnamed_tables()  # a table added mid-move: its rows would stay behind
    with watching(ctx, sid):
        flipped = _cutover(ctx, sid, shard.region, ctx.origin(shard))
    keep_frozen(ctx, sid)
    return flipped


def keep_frozen(ctx: Context, sid: str) -> CopyDigest | None:
    """The source copy as the cutover left it, read after the flip (outside the window: the
    fence keeps the users' source rows still) and kept by the state machine, for the purge's
    recheck. A failure here is logged, never raised: the shard has cut over, and its purge
    reads the copy then, the fence held since."""
    try:
        d = digest_copy(ctx, sid, ctx.origin_dsn(ctx.control.shard(sid)))
        ctx.control.keep(sid, {"event": "source copy frozen", "digest": d.digest}, frozen=d.record())
        return d
    except Exception as exc:  # noqa: BLE001 - the move has happened
        log.warning("shard %s cut over; its source copy was not digested now: %s", sid, describe(exc))
        return None


def _cutover(ctx: Context, sid: str, region: str, origin: str) -> int:
    ctl = ctx.control
    src, dst = ctx.dsn(origin), ctx.dsn(region)
    window = ctx.spec.changes.fence_window_s
    # Lag first: fencing a shard whose backlog cannot be applied in the window would only
    # cost the users write downtime.
    capture.catch_up(ctx, sid, src, dst, "forward", pending_at_most=ctx.spec.changes.catch_up_below)
    t0: float | None = None
    decided = False
    try:
        # users an earlier rollback or move left refused at the destination: the window lifts that
        # guard once decided; for everyone else it need not reach the destination at all
        returning = _stage_lists(ctx, sid, src, dst)
        # The directory's rows are flipped in a transaction left open across the window:
        # nobody sees the new homes before it commits, and the commit, not the update of
        # every user's row, is what the window has to wait for.
        with directory.prepared_flip(ctx, sid) as flip, _far(src, dst, sid, window) as far:
            ours = capture.own_transaction(src, flip.conn)  # the open flip must not hold the fence up
            settled = _compare_changed_so_far(ctx, sid, src, dst, ours)
            hooks.point("staged", ctx, sid)
            flip.bound(ctx.spec.changes.dead_session_s)  # a worker lost from here holds the flip this long
            t0 = time.monotonic()
            deadline = t0 + window
            steps = Steps(t0)
            with bounded(deadline):
                capture.fence(src, sid, deadline, ignore=ours)
                steps.mark("raise")
                hooks.point("fenced", ctx, sid)
                # the last changes applied and every row changed since `settled` compared, in
                # one message to the destination a pass (`shard.window`)
                _, diffs = settle(ctx, sid, src, dst, far, settled=settled, deadline=deadline, ignore=ours)
                if diffs:
                    raise ChecksumMismatch(f"shard {sid}: {len(diffs)} row(s) differ inside the fence", diffs)
                checked = sum(map(len, capture.touched_keys(src, sid, after=settled).values()))
                steps.mark("catch_up_compare")
                if time.monotonic() > deadline:
                    raise TimeoutError("fence window exceeded")
                # The decision: once the source fence is held, the shard cuts over, whatever
                # happens to this process (see `recovery`).
                capture.hold_fence(src, sid)
                decided = True
                steps.mark("hold")
                hooks.point("arriving", ctx, sid)
                if returning:  # homed here from now on: what refused them here goes
                    capture.arrive(dst, sid)
                    steps.mark("arrive")
            hooks.point("held", ctx, sid)
            steps.mark("transition")
            flip.finish({"fence_checked_rows": checked})
        # The window closed when the flip committed, as the block above ended.
        steps.mark("commit")
    except BaseException as exc:
        elapsed = round((time.monotonic() - t0) * 1000, 1) if t0 is not None else 0.0
        if decided or not isinstance(exc, Exception):
            # Past the decision (or interrupted where it may have been taken): recovery
            # finishes the flip, or lifts the fence if the hold never committed.
            _resolve_now(ctx, sid, exc)
            raise
        capture.lift(src, sid)
        capture.stop_capture(ctx, dst, sid, fence_too=True, wait=False)
        if t0 is None:
            ctl.record(sid, "verified", {"event": "cutover stopped before the fence", "error": describe(exc)})
        else:
            ctl.record(sid, "verified", {"event": "fence lifted", "fence_ms": elapsed, "error": describe(exc)})
        if isinstance(exc, TimeoutError) or getattr(exc, "sqlstate", None) in ("57014", "55P03"):
            raise FenceWindowExceeded(
                f"shard {sid}: cutover did not finish in its {window} s fence window ({elapsed} ms: "
                f"{describe(exc)}); the fence was lifted and the shard stays on the source"
            ) from None
        raise
    # Cut over: from here on nothing may lift the fence.
    fence_ms = round(sum(steps.ms.values()), 1)
    region = ctl.shard(sid).region
    metrics.fence_window(sid, region, fence_ms)
    log.info(
        "shard %s cut over: %d users homed at %s; fence window %.1f ms (%s)",
        sid,
        flip.flipped,
        region,
        fence_ms,
        ", ".join(f"{k} {v:.1f} ms" for k, v in steps.ms.items()),
    )
    try:
        ctl.record(sid, "cut_over", {"event": "fence closed", "fence_ms": fence_ms, "fence_steps_ms": steps.ms})
    except Exception as exc:
        log.warning("shard %s cut over; its fence window was not recorded: %s", sid, describe(exc))
    return flip.flipped


def _far(src: str, dst: str, sid: str, window: float) -> AbstractContextManager[Conn | None]:
    """Where the application writes the shard's users, a connection to the destination opened
    before the window, for its catch-up and compare: a new connection across an ocean is
    several round trips (docs/across-an-ocean.md). Where it has not, none: the window has
    nothing to apply there unless a write lands in the moment before the fence."""
    return closing(capture.far_session(dst, window)) if capture.written(src, sid) else nullcontext()


def _stage_lists(ctx: Context, sid: str, src: str, dst: str) -> int:
    """The shard's two user lists, written at once on their two servers before the window:
    at the source the users to fence, written while they still write; at the destination
    the users whose writes are logged (for a rollback) from before the flip: until the
    directory says so only the migrator writes them there, and its apply sessions are not
    logged. Written here, neither list costs the window anything. A failure of either
    reaches the caller once both have ended, so its clean-up finds neither still writing.
    Returns how many of the users the destination refuses for good (an earlier rollback's
    guard, or the held fence of an earlier move of theirs away from it); no rollback can
    add to them now, as a user is in one live shard."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lists-{sid}") as pool:
        at_destination = pool.submit(capture.start_capture, ctx, dst, sid, wait_s=None)
        capture.stage_fence(src, sid, ctx.control)  # on a failure, leaving the pool still waits for the other
    return at_destination.result()


def _resolve_now(ctx: Context, sid: str, exc: BaseException) -> None:
    """After a failure past the decision: finish the flip (or lift an unheld fence) here,
    once; if that fails too, the watchdog and the phase's rerun (which resolves first) do."""
    try:
        done = recovery.resolve_shard(ctx, ctx.control.shard(sid))
        log.warning("shard %s: cutover interrupted (%s); %s", sid, describe(exc), ", ".join(done) or "nothing was due")
    except Exception as again:
        log.error("shard %s: cutover interrupted (%s) and not resolved yet (%s)", sid, describe(exc), describe(again))


def _compare_changed_so_far(
    ctx: Context, sid: str, src: str, dst: str, ours: tuple[int, ...], rounds: int = 2
) -> tuple[int, int]:
    """Before the fence, while the users still write: catch up, then compare every row
    changed up to the position reached. A difference on a row changed again since is left
    for later; any other is a real one, and the cutover stops before anyone is fenced. A
    second round does the same for the rows changed during the first, so what the fence
    must still compare (every row changed past the returned position) is what a writer
    does in about one short round."""
    settled: tuple[int, int] | None = None
    upto: tuple[int, int] = (0, 0)
    for _ in range(rounds):
        capture.catch_up(ctx, sid, src, dst, "forward", pending_at_most=ctx.spec.changes.catch_up_below, ignore=ours)
        upto = ctx.control.position(sid, "forward")
        hooks.point("settled", ctx, sid)
        # bounded as a catch-up's lock waits are: a table locked on either side must not
        # keep the flip's transaction (whose id every capture start on its server waits
        # for) open for as long as the lock lasts
        with bounded(time.monotonic() + ctx.spec.changes.lock_wait_s):
            touched = compare_touched(ctx, sid, log_at=src, origin=src, destination=dst, after=settled, upto=upto)
        if touched:
            diffs = not_changed_since(touched, capture.touched(src, sid, after=upto))
            if diffs:
                raise ChecksumMismatch(f"shard {sid}: {len(diffs)} changed row(s) differ before the fence", diffs)
        settled = upto
    return upto


class Steps:
    """Milliseconds each step of the fence window took, for the audit trail."""

    def __init__(self, t0: float):
        self.last = t0
        self.ms: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = round((now - self.last) * 1000, 1)
        self.last = now
