"""Runs shards through their phases: copy -> verify -> cutover, one shard at a time per
worker, each under its advisory lock. A shard that fails is recorded and the others go on;
the caller learns which failed from the outcomes."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from migrator.context import Context
from migrator.control import Shard
from migrator.copier import copy_shard
from migrator.cutover import cutover_shard
from migrator.errors import ChecksumMismatch, MigratorError, describe, is_transient
from migrator.planner import Plan, plan
from migrator.rollback import rollback_shard
from migrator.state import RUNNABLE, Phase
from migrator.verifier import verify_shard

log = logging.getLogger("migrator.engine")

Progress = Callable[[str, int, int], None]


@dataclass
class Outcome:
    shard_id: str
    ok: bool
    state: str = ""
    error: str | None = None
    transient: bool = False
    differences: list[dict] = field(default_factory=list)


def select(ctx: Context, wave: str | None, names: list[str] | None, region: str | None) -> list[Shard]:
    if not ctx.control.exists():
        return []
    return ctx.control.shards(wave=wave, names=names, region=region)


def _guard(sid: str, fn: Callable[[], object]) -> Outcome:
    try:
        fn()
        return Outcome(sid, True)
    except ChecksumMismatch as exc:
        return Outcome(sid, False, error=str(exc), differences=exc.differences)
    except MigratorError as exc:
        return Outcome(sid, False, error=str(exc), transient=is_transient(exc))
    except Exception as exc:  # driver errors: classify, never echo their text (it may hold row data)
        log.error("shard %s failed: %s", sid, describe(exc))
        return Outcome(sid, False, error=describe(exc), transient=is_transient(exc))


def run_shard(ctx: Context, sid: str, *, through: Phase = Phase.CUT_OVER, progress: Progress | None = None) -> Outcome:
    """Advance one shard as far as `through` (copied, verified or cut_over)."""
    ctl = ctx.control

    def go() -> None:
        with ctl.lock(sid):
            shard = ctl.shard(sid)
            if shard.state in (Phase.PLANNED, Phase.COPYING, Phase.FAILED):
                copy_shard(ctx, sid, progress=(lambda d, t: progress(sid, d, t)) if progress else None)
            if through == Phase.COPIED:
                return
            if ctl.shard(sid).state == Phase.COPIED:
                verify_shard(ctx, sid)
            if through == Phase.VERIFIED:
                return
            if ctl.shard(sid).state == Phase.VERIFIED:
                cutover_shard(ctx, sid)

    out = _guard(sid, go)
    out.state = ctl.shard(sid).state.value
    return out


def cleanup_shard(ctx: Context, sid: str) -> None:
    """Remove what capture installed for a finished shard (cut over or rolled back)."""
    from migrator import capture

    ctl = ctx.control
    shard = ctl.shard(sid)
    src, dst = ctx.source_dsn, ctx.dsn(shard.region)
    if shard.state == Phase.CUT_OVER:
        capture.finalize(ctx, sid, src, dst)
        with ctl.connect() as c:
            ctl.audit(c, sid, shard.state.value, shard.state.value, {"event": "finalized"})
    elif shard.state == Phase.ROLLED_BACK:
        for dsn in (src, dst):
            capture.stop_capture(ctx, dsn, sid, fence_too=True)
    else:
        from migrator.errors import StateConflict

        raise StateConflict(f"shard {sid} is {shard.state}; only a cut-over or rolled-back shard is cleaned up")


def one_phase(ctx: Context, sid: str, phase: str, reason: str = "") -> Outcome:
    ctl = ctx.control
    fns = {
        "cleanup": lambda: cleanup_shard(ctx, sid),
        "copy": lambda: copy_shard(ctx, sid),
        "verify": lambda: verify_shard(ctx, sid),
        "cutover": lambda: cutover_shard(ctx, sid),
        "rollback": lambda: rollback_shard(ctx, sid, reason),
    }

    def go() -> None:
        with ctl.lock(sid):
            fns[phase]()

    out = _guard(sid, go)
    out.state = ctl.shard(sid).state.value
    return out


def run(
    ctx: Context,
    wave: str,
    *,
    names: list[str] | None = None,
    region: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress | None = None,
) -> tuple[Plan, list[Outcome]]:
    p = plan(ctx, wave, since=since, until=until, regions=[region] if region else None)
    outcomes = []
    for shard in select(ctx, wave, names, region):
        if shard.state not in RUNNABLE:
            outcomes.append(Outcome(shard.shard_id, shard.state == Phase.CUT_OVER, shard.state.value,
                                    None if shard.state == Phase.CUT_OVER else f"shard is {shard.state}"))
            continue
        outcomes.append(run_shard(ctx, shard.shard_id, progress=progress))
    return p, outcomes
