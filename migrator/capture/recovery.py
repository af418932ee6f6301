"""Finishes what a killed cutover or rollback left half done, so no fence outlives its cause.

Design
------
A cutover decides to cut over when it makes the source fence permanent (`hold_fence`,
one row in the source's own transaction), after the last comparison inside the fence and
before the directory flip commits. A rollback of a cut-over shard decides when it holds
the destination's fence, after carrying the writes back and before the flip back commits.
So the decision is always recorded on the side that refuses the users' writes. (The
source here is the shard's origin: the source region for a first move, the home the users
leave when they move again.)

* before it, everything undoes itself: a fence that is up but not held expires at the end
  of its window, and the open flip dies with its connection;
* after it, the flip (or flip back) is due, and finishing it late is safe: the fenced side
  takes no writes, and the other side is written by nobody until the directory names it.

`resolve_shard` reads the fences and the shard's state and does what is due: completes
the flip, lifts a fence whose cause is gone, or holds the source fence of a cut-over
shard; each action is audited. It runs first in every command and task that works on a
shard, in the watchdog a cutover or rollback leaves behind it (see `watchdog`), and in
`migrator recover`. The users of a shard whose worker died cannot write at any home for
at most the fence window plus the time until one of those runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from migrator import capture
from migrator.control import directory
from migrator.control.context import Context
from migrator.control.state import MOVED, State
from migrator.control.store import Shard
from migrator.errors import ShardBusy, StateConflict, describe

log = logging.getLogger("migrator.capture.recovery")

ROLLBACK_REQUESTED = "rollback requested"


@dataclass(frozen=True)
class Unfinished:
    """A shard whose fences disagree with its state: what is due, and why."""

    shard_id: str
    state: str
    source_fence: str | None
    destination_fence: str | None
    due: str


def _due(state: State, src: str | None, dst: str | None) -> str | None:
    """What recovery must do for a shard in `state` with these fences (None: nothing)."""
    if state == State.VERIFIED and src == capture.HELD:
        return "complete the cutover's flip (the source fence was held, the flip did not commit)"
    if state == State.VERIFIED and src is not None:
        return "lift the source fence of a cutover that did not finish"
    if state in MOVED and src != capture.HELD:
        return "hold the source fence of a cut-over shard"
    if state == State.CUT_OVER and dst == capture.HELD:
        return "complete the rollback's flip back (the destination fence was held, the flip back did not commit)"
    if state == State.CUT_OVER and dst is not None:
        return "lift the destination fence of a rollback that did not finish"
    if state != State.VERIFIED and state not in MOVED and src is not None:
        return "lift the source fence: the shard's users are homed at the source"
    return None


def _audit(ctx: Context, sid: str, state: State, event: str, **detail: object) -> None:
    ctx.control.record(sid, state.value, {"event": event, "by": "recovery", **detail})
    log.warning("shard %s: %s (recovery)", sid, event)


def resolve_shard(ctx: Context, shard: Shard) -> list[str]:
    """Do what is due for one shard (the caller holds its lock); returns what was done."""
    if not ctx.spec.changes.capture:
        return []
    sid, ctl = shard.shard_id, ctx.control
    src, dst = ctx.origin_dsn(shard), ctx.dsn(shard.region)
    done: list[str] = []
    state = shard.state
    s = capture.fences(src, sid).get(sid)
    if state == State.VERIFIED and s == capture.HELD:
        try:
            capture.arrive(dst, sid)  # as the cutover does once decided: they are homed there next
            n = directory.flip(ctx, sid, {"completed_by": "recovery", "fence": "held before the flip"})
            _audit(ctx, sid, State.CUT_OVER, "cutover completed", users=n)
            done.append("cutover completed")
            state = State.CUT_OVER
        except StateConflict as exc:  # the users are not all at the source: never fence them there
            capture.lift(src, sid)
            _audit(ctx, sid, state, "source fence lifted", error=str(exc))
            done.append("source fence lifted")
    elif state in MOVED and s != capture.HELD:
        capture.install(ctx, src)
        capture.stage_fence(src, sid, ctl, not_homed_at=ctx.origin(shard))  # a user moved back writes there
        capture.hold_now(src, sid)
        _audit(ctx, sid, state, "source fence held")
        done.append("source fence held")
    elif state not in MOVED and s is not None:
        capture.lift(src, sid)
        _audit(ctx, sid, state, "source fence lifted", fence=s)
        done.append("source fence lifted")
    if state == State.CUT_OVER:
        d = capture.fences(dst, sid).get(sid)
        if d == capture.HELD:
            reason = ctl.shard(sid).rollback_reason or ""
            directory.flip_back(
                ctx,
                sid,
                State.CUT_OVER,
                shard.region,
                ctx.origin(shard),
                {"event": "rollback started", "reason": reason, "completed_by": "recovery"},
            )
            capture.lift(src, sid)  # homed at the source again: they write there
            _audit(ctx, sid, State.ROLLING_BACK, "rollback's flip back completed; source fence lifted")
            done.append("rollback's flip back completed")
        elif d is not None:
            capture.lift(dst, sid)
            _audit(ctx, sid, state, "destination fence lifted", fence=d)
            done.append("destination fence lifted")
    return done


def unfinished(ctx: Context, shards: list[Shard] | None = None) -> list[Unfinished]:
    """Shards whose fences disagree with their state (read only; a region that cannot be
    reached is left out, with a warning)."""
    if not ctx.spec.changes.capture or not ctx.control.exists():
        return []
    if shards is None:
        shards = ctx.control.shards(
            states=[State.VERIFIED, *MOVED, State.ROLLING_BACK, State.ROLLED_BACK, State.FAILED]
        )
    if not shards:
        return []
    # each shard's fence at its origin (the source region, or the home a move again left)
    src: dict[str, str] = {}
    for origin in sorted({ctx.origin(s) for s in shards}):
        try:
            fenced = capture.fences(ctx.dsn(origin))
        except Exception as exc:
            log.warning("recovery: region %s cannot be read: %s", origin, describe(exc))
            shards = [s for s in shards if ctx.origin(s) != origin]
            continue
        src.update((s.shard_id, fenced[s.shard_id]) for s in shards if ctx.origin(s) == origin and s.shard_id in fenced)
    dst: dict[str, dict[str, str]] = {}
    for region in sorted({s.region for s in shards if s.state == State.CUT_OVER}):
        try:
            dst[region] = capture.fences(ctx.dsn(region))
        except Exception as exc:
            log.warning("recovery: region %s cannot be read: %s", region, describe(exc))
    out = []
    for s in shards:
        d = dst.get(s.region, {}).get(s.shard_id)
        due = _due(s.state, src.get(s.shard_id), d)
        if due:
            out.append(Unfinished(s.shard_id, s.state.value, src.get(s.shard_id), d, due))
    return out


def sweep(ctx: Context, shards: list[Shard] | None = None) -> dict[str, list[str]]:
    """Resolve every unfinished shard whose worker is gone (its lock is free); shards being
    worked on are left to their worker. Errors are logged and the others go on."""
    done: dict[str, list[str]] = {}
    for u in unfinished(ctx, shards):
        try:
            with ctx.control.lock(u.shard_id):
                acts = resolve_shard(ctx, ctx.control.shard(u.shard_id))
            if acts:
                done[u.shard_id] = acts
        except ShardBusy:
            continue
        except Exception as exc:
            log.warning("recovery of shard %s failed for now: %s", u.shard_id, describe(exc))
    return done
