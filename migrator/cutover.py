"""Hands a verified shard's users to their new region in the ownership directory.

The check that the shard is verified and the flip of every user's home (epoch + 1) are
one transaction in the control database: a shard that was not verified, or whose users
are no longer all at the source, cannot be cut over, and a half-flipped shard cannot exist.
With change capture that transaction updates the directory before the write fence goes up
and commits as the fence window's last step, so the users' write downtime does not grow
with their number. The source rows stay until a later purge.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

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
        return _flip(ctx, sid)
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
        # Destination writes of the shard's users are logged (for a rollback) from before the
        # flip: until the directory says so only the migrator writes them there, and its
        # apply sessions are not logged. Written here, the list costs the window nothing.
        capture.start_capture(ctx, dst, sid, wait_s=None)
        # The directory's rows are flipped in a transaction left open across the window:
        # nobody sees the new homes before it commits, and the commit, not the update of
        # every user's row, is what the window has to wait for.
        with _prepared_flip(ctx, sid) as flip:
            ours = capture.own_transaction(src, flip.conn)  # the open flip must not hold the fence up
            settled = _compare_changed_so_far(ctx, sid, src, dst, ours)
            pause_point(ctx, sid, "staged")
            t0 = time.monotonic()
            deadline = t0 + window
            steps = Steps(t0)
            with bounded(deadline):
                capture.fence(src, sid, deadline, ignore=ours)
                steps.mark("raise")
                pause_point(ctx, sid, "fenced")
                capture.catch_up(ctx, sid, src, dst, "forward", deadline=deadline, ignore=ours)
                steps.mark("catch_up")
                diffs = compare_touched(ctx, sid, src, dst, after=settled)
                if diffs:
                    raise ChecksumMismatch(f"shard {sid}: {len(diffs)} row(s) differ inside the fence", diffs)
                checked = sum(map(len, capture.touched_keys(src, sid, after=settled).values()))
                steps.mark("compare")
                capture.hold_fence(src, sid)
                steps.mark("hold")
                if time.monotonic() > deadline:
                    raise TimeoutError("fence window exceeded")
            flip.finish({"fence_checked_rows": checked}, steps)
        # The window closed when the flip committed, as the block above ended.
        steps.mark("commit")
    except BaseException as exc:
        capture.lift(src, sid)
        capture.stop_capture(ctx, dst, sid, fence_too=True, wait=False)
        elapsed = round((time.monotonic() - t0) * 1000, 1) if t0 is not None else 0.0
        with ctl.connect() as c:
            if t0 is None:
                ctl.audit(c, sid, "verified", "verified", {"event": "cutover stopped before the fence", "error": describe(exc)})
            else:
                ctl.audit(c, sid, "verified", "verified", {"event": "fence lifted", "fence_ms": elapsed, "error": describe(exc)})
        if isinstance(exc, TimeoutError) or getattr(exc, "sqlstate", None) in ("57014", "55P03"):
            raise FenceWindowExceeded(
                f"shard {sid}: cutover did not finish in its {window} s fence window ({elapsed} ms); "
                "the fence was lifted and the shard stays on the source") from None
        raise
    # Cut over: from here on nothing may lift the fence.
    try:
        with ctl.connect() as c:
            ctl.audit(c, sid, "cut_over", "cut_over", {"event": "fence closed", "fence_ms": round(sum(steps.ms.values()), 1),
                                                       "fence_steps_ms": steps.ms})
    except Exception as exc:
        log.warning("shard %s cut over; its fence window was not recorded: %s", sid, describe(exc))
    return flip.flipped


def _compare_changed_so_far(ctx: Context, sid: str, src: str, dst: str, ours: tuple[int, ...],
                            rounds: int = 2) -> tuple[int, int]:
    """Before the fence, while the users still write: catch up, then compare every row
    changed up to the position reached. A difference on a row changed again since is left
    for later; any other is a real one, and the cutover stops before anyone is fenced. A
    second round does the same for the rows changed during the first, so what the fence
    must still compare (every row changed past the returned position) is what a writer
    does in about one short round."""
    from migrator.verifier import compare_touched, not_changed_since

    settled = None
    for _ in range(rounds):
        capture.catch_up(ctx, sid, src, dst, "forward", until=ctx.spec.changes.catch_up_below, ignore=ours)
        upto = ctx.control.position(sid, "forward")
        pause_point(ctx, sid, "settled")
        diffs = compare_touched(ctx, sid, src, dst, after=settled, upto=upto)
        if diffs:
            diffs = not_changed_since(diffs, capture.touched(src, sid, after=upto))
            if diffs:
                raise ChecksumMismatch(f"shard {sid}: {len(diffs)} changed row(s) differ before the fence", diffs)
        settled = upto
    return settled


class Steps:
    """Milliseconds each step of the fence window took, for the audit trail."""

    def __init__(self, t0: float):
        self.last, self.ms = t0, {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = round((now - self.last) * 1000, 1)
        self.last = now


class _Flip:
    def __init__(self, ctx: Context, conn, sid: str, region: str, digest: str, users: int, flipped: int):
        self.ctx, self.conn, self.sid = ctx, conn, sid
        self.region, self.digest, self.users, self.flipped = region, digest, users, flipped

    def finish(self, detail: dict, steps: Steps | None = None) -> None:
        """The shard's move to cut_over, in the flip's transaction (committed by the caller's block)."""
        if steps is not None:
            steps.mark("transition")
        self.ctx.control.transition(
            self.conn, self.sid, Phase.VERIFIED, Phase.CUT_OVER,
            {"event": "cutover", "users": self.users, "to": self.region, "digest": self.digest, **detail},
            digest=self.digest)


@contextlib.contextmanager
def _prepared_flip(ctx: Context, sid: str) -> Iterator[_Flip]:
    """Flip the shard's users' homes in the directory (epoch + 1) in a transaction that
    commits when the block ends without error (after `finish`) and is rolled back
    otherwise. The shard's row is locked throughout: only a verified shard whose users are
    all still at the source is flipped."""
    ctl = ctx.control
    with ctl.connect() as c:
        # One open flip at a time: each is left out of its own fence's wait for earlier
        # transactions but not of another's, so two open at once could wait on each other
        # until both windows ran out. A second cutover waits here, before its fence.
        c.execute("SELECT pg_advisory_xact_lock(hashtext('migrator:flip'))")
        row = c.execute(
            # NO KEY UPDATE: rows that refer to the shard (catch-up positions) can still be written
            f"SELECT state, digest, region, users FROM {SCHEMA}.shard WHERE shard_id = %s FOR NO KEY UPDATE", (sid,)
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
            raise StateConflict(
                f"shard {sid}: {users - flipped} of its {users} users are no longer homed at "
                f"{ctx.spec.source_region}; cutover refused"
            )
        yield _Flip(ctx, c, sid, region, digest, users, flipped)


def _flip(ctx: Context, sid: str) -> int:
    """Flip the shard's users (no change capture, so no fence); returns how many directory rows changed."""
    with _prepared_flip(ctx, sid) as flip:
        flip.finish({})
    return flip.flipped
