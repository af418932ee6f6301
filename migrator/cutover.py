"""Hands a verified shard's users to their new region in the ownership directory.

The check that the shard is verified and the flip of every user's home (epoch + 1) are
one transaction in the control database: a shard that was not verified, or whose users
are no longer all at the source, cannot be cut over, and a half-flipped shard cannot exist.
The source rows stay until a later purge.
"""
from __future__ import annotations

import logging
import os
import time

from migrator import capture
from migrator.context import Context
from migrator.control import SCHEMA
from migrator.errors import ChecksumMismatch, StateConflict, TransientError, describe
from migrator.state import Phase
from migrator.stores.postgres import bounded

log = logging.getLogger("migrator.cutover")


class FenceWindowExceeded(TransientError):
    """The fenced part of a cutover did not finish in its window: the fence was lifted and
    the shard stays on the source; cutover is retried later."""


def pause_point(ctx: Context, sid: str, name: str) -> None:
    """A place where tests stop the process (MIGRATOR_PAUSE_AT=name) to kill it there."""
    if os.environ.get("MIGRATOR_PAUSE_AT") == name:
        with ctx.control.connect() as c:
            ctx.control.audit(c, sid, None, None, {"event": f"paused at {name}"})
        time.sleep(float(os.environ.get("MIGRATOR_PAUSE_S", "60")))


def cutover_shard(ctx: Context, sid: str) -> int:
    """Cut the shard over; with change capture, inside a bounded write fence."""
    if not ctx.spec.changes.capture:
        return _flip(ctx, sid, {})
    ctl = ctx.control
    shard = ctl.shard(sid)
    if shard.state != Phase.VERIFIED:
        raise StateConflict(f"shard {sid} is {shard.state}; only a verified shard can be cut over")
    src, dst = ctx.source_dsn, ctx.dsn(shard.region)
    window = ctx.spec.changes.fence_window_s
    # Lag first: fencing a shard whose backlog cannot be applied in the window would only
    # cost the users write downtime.
    capture.catch_up(ctx, sid, src, dst, "forward", until=ctx.spec.changes.catch_up_below)
    from migrator.verifier import compare_touched

    t0: float | None = None
    try:
        capture.stage_fence(src, sid, ctl)  # the list of users to fence, written while they still write
        t0 = time.monotonic()
        deadline = t0 + window
        steps = Steps(t0)
        with bounded(deadline):
            capture.fence(src, sid, deadline)
            steps.mark("raise")
            pause_point(ctx, sid, "fenced")
            capture.catch_up(ctx, sid, src, dst, "forward", deadline=deadline)
            steps.mark("catch_up")
            capture.start_capture(ctx, dst, sid, wait_s=None)  # destination writes after the flip are logged
            steps.mark("destination_capture")
            diffs = compare_touched(ctx, sid, src, dst)
            if diffs:
                raise ChecksumMismatch(f"shard {sid}: {len(diffs)} row(s) differ inside the fence", diffs)
            checked = len(capture.touched_keys(src, sid))
            steps.mark("compare")
            capture.hold_fence(src, sid)
            steps.mark("hold")
            if time.monotonic() > deadline:
                raise TimeoutError("fence window exceeded")
            # The window closes when the directory's flip commits: its length is taken
            # there, after the flip's update (see `_flip`).
            return _flip(ctx, sid, {"fence_checked_tables": checked}, fence_t0=t0, steps=steps)
    except BaseException as exc:
        capture.lift(src, sid)
        capture.stop_capture(ctx, dst, sid, fence_too=True)
        elapsed = round((time.monotonic() - t0) * 1000, 1) if t0 is not None else 0.0
        with ctl.connect() as c:
            ctl.audit(c, sid, "verified", "verified", {"event": "fence lifted", "fence_ms": elapsed, "error": describe(exc)})
        if isinstance(exc, TimeoutError) or getattr(exc, "sqlstate", None) in ("57014", "55P03"):
            raise FenceWindowExceeded(
                f"shard {sid}: cutover did not finish in its {window} s fence window ({elapsed} ms); "
                "the fence was lifted and the shard stays on the source") from None
        raise


class Steps:
    """Milliseconds each step of the fence window took, for the audit trail."""

    def __init__(self, t0: float):
        self.last, self.ms = t0, {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = round((now - self.last) * 1000, 1)
        self.last = now


def _flip(ctx: Context, sid: str, detail: dict, new_digest: str | None = None, fence_t0: float | None = None,
          steps: Steps | None = None) -> int:
    """Flip the shard's users; returns how many directory rows changed. With `fence_t0`
    (when the fence went up), the audit records the fence window up to the commit."""
    ctl = ctx.control
    with ctl.connect() as c:
        row = c.execute(
            f"SELECT state, digest, region, users FROM {SCHEMA}.shard WHERE shard_id = %s FOR UPDATE", (sid,)
        ).fetchone()
        if row is None:
            raise StateConflict(f"shard {sid} does not exist")
        state, digest, region, users = row
        if state != Phase.VERIFIED.value or not digest:
            raise StateConflict(f"shard {sid} is {state}; only a verified shard can be cut over")
        flipped = c.execute(
            f"UPDATE {SCHEMA}.directory d SET home = %s, epoch = d.epoch + 1, updated_at = now() "
            f"FROM {SCHEMA}.shard_user su WHERE su.shard_id = %s AND su.user_key = d.user_key AND d.home = %s",
            (region, sid, ctx.spec.source_region),
        ).rowcount
        if flipped != users:
            c.rollback()
            raise StateConflict(
                f"shard {sid}: {users - flipped} of its {users} users are no longer homed at "
                f"{ctx.spec.source_region}; cutover refused"
            )
        digest = new_digest or digest
        if fence_t0 is not None:
            if steps is not None:
                steps.mark("flip")
                detail = {"fence_steps_ms": steps.ms, **detail}
            detail = {"fence_ms": round((time.monotonic() - fence_t0) * 1000, 1), **detail}
        ctl.transition(c, sid, Phase.VERIFIED, Phase.CUT_OVER,
                       {"event": "cutover", "users": users, "to": region, "digest": digest, **detail}, digest=digest)
    return flipped
