"""Runs a phase for a shard, and says once what a failure means.

The command line, the engine's `run` and every Airflow task go through
`run_phase`/`advance`, which take the shard's lock, resolve what a killed cutover or
rollback left unfinished (`recovery`), ask the one gate (`gate.decide`), run the phase,
and classify a failure once. A dry run asks the same gate, then the phase's dry
implementation (`DRY_RUNS`) says what it would do, writing nothing.

* transient (a store down, a lock held too long, a fence window missed): the shard keeps
  its state and resumes from its checkpoint when the phase runs again;
* terminal (a difference that persists, a conflict, a constraint the destination
  refuses): the shard moves to `failed` where the transition table allows it, which is
  what lets an automatic rollback act;
* a spec or state problem: nothing is recorded; the caller is told.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from migrator import hooks
from migrator.capture import recovery
from migrator.control import holds
from migrator.control.context import Context
from migrator.control.state import State, allowed
from migrator.differences import records
from migrator.errors import (
    ChecksumMismatch,
    ControlUnavailable,
    PurgeRefused,
    SpecError,
    StateConflict,
    describe,
)
from migrator.evidence import chain
from migrator.evidence import manifest as evidence
from migrator.lifecycle.gate import FORWARD, SUPERSEDED, Verdict, decision
from migrator.phases.cleanup import cleanup_shard
from migrator.phases.copy import copy_shard
from migrator.phases.cutover import FenceWindowExceeded, cutover_shard
from migrator.phases.purge import purge_shard
from migrator.phases.purge import would_purge as purge_preview
from migrator.phases.rollback import rollback_shard
from migrator.phases.verify import verify_shard
from migrator.stores import is_transient

log = logging.getLogger("migrator.lifecycle.dispatch")

P = State


def preview(ctx: Context, sid: str, phase: str) -> dict[str, Any]:
    """What `run_phase` would do now: the shard's state and the decision."""
    shard = ctx.control.shard(sid)
    d = decision(ctx, shard, phase)
    return {"shard_id": sid, "phase": phase, "state": shard.state.value, "would": d.verdict.value, "why": d.why}


def dry_run(ctx: Context, sid: str, phase: str) -> dict[str, Any]:
    """The decision, then (where it runs) the phase's dry implementation: what it would do,
    with nothing written. A refusal raises as `run_phase` would."""
    shard = ctx.control.shard(sid)
    d = decision(ctx, shard, phase)
    if d.verdict == Verdict.REFUSE:
        raise StateConflict(f"shard {sid} {d.why}")
    if d.verdict == Verdict.SKIP or phase not in DRY_RUNS:
        return preview(ctx, sid, phase)
    return DRY_RUNS[phase](ctx, sid).summary()


@dataclass(frozen=True)
class Result:
    """One phase of one shard as the faces see it: the state it ended in, whether it ran
    or why not, and what it did as the faces print it (`detail`, from the phase's typed
    result by its runner)."""

    shard_id: str
    phase: str
    state: str
    ran: bool
    skipped: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shard_id": self.shard_id, "phase": self.phase, "state": self.state, "ran": self.ran}
        if self.skipped:
            out["skipped"] = self.skipped
        out.update(self.detail)
        return out


class DryRun(Protocol):
    """A phase's dry implementation's answer: what it would do, as the faces print it."""

    def summary(self) -> dict[str, Any]: ...


Progress = Callable[[int, int], None]


def _copy(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    r = copy_shard(ctx, sid, progress=progress)
    return {"batches": r.batches, "copied_now": r.copied_now, "rows": r.rows}


def _verify(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    r = verify_shard(ctx, sid)
    return {"digest": r.digest, "rows": r.rows}


def _cutover(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    return {"users": cutover_shard(ctx, sid)}


def _rollback(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    r = rollback_shard(ctx, sid, reason)
    return {"deleted": dict(r.deleted), "objects_deleted": r.objects_deleted}


def _cleanup(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    return {"finalized": cleanup_shard(ctx, sid)}


def _purge(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    r = purge_shard(ctx, sid, progress=progress)
    return {"purged": r.receipts, "batches": r.batches}


def _release(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    return {"released": holds.release(ctx, sid, reason)}


def _retry(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    holds.move_again(ctx, sid, reason)
    return {"planned_again": True}


RUNNERS: dict[str, Callable[[Context, str, str, Progress | None], dict[str, Any]]] = {
    "copy": _copy,
    "verify": _verify,
    "recheck": _verify,
    "cutover": _cutover,
    "rollback": _rollback,
    "rollback_failed": _rollback,
    "cleanup": _cleanup,
    "release": _release,
    "retry": _retry,
    "purge": _purge,
}
# Each phase's second implementation: what it would do, writing nothing.
DRY_RUNS: dict[str, Callable[[Context, str], DryRun]] = {"purge": purge_preview}


def record_failure(ctx: Context, sid: str, phase: str, exc: BaseException) -> None:
    """The one classification of a phase's failure (see the module's docstring)."""
    if isinstance(exc, (SpecError, StateConflict, PurgeRefused)) or not isinstance(exc, Exception):
        return
    ctl = ctx.control
    what = describe(exc)
    try:
        state = ctl.shard(sid).state
        if is_transient(exc):  # the shard keeps its state, and the error until a step succeeds
            ctl.keep(sid, {"event": f"{phase} interrupted", "error": what, "resumable": True}, error=what[:2000])
            return
        detail: dict[str, Any] = {"event": f"{phase} failed", "error": what}
        if isinstance(exc, ChecksumMismatch):
            detail["named"] = records(exc.differences[:50])
        if allowed(state, P.FAILED):
            ctl.move(sid, state, P.FAILED, detail, error=what[:2000])
        else:
            ctl.record(sid, state.value, detail)
    except Exception as again:  # the control database itself is away: the failure stays unrecorded
        log.error("shard %s: %s failed (%s); recording it failed too (%s)", sid, phase, what, describe(again))


def step(ctx: Context, sid: str, phase: str, reason: str = "", progress: Progress | None = None) -> Result:
    """Decide and run one phase; the caller holds the shard's lock. This is the one level
    at which the library retries a store's transient error: the phase runs again from its
    checkpoint, after resolving what the failure left unfinished, with backoff, until
    `retry.attempts` tries in a row have made no progress (a checkpoint or a state gained
    resets the count). Phases do not retry inside; the control database's own calls ride
    out its outages where they are made (`ControlUnavailable` past that is not retried
    here). A missed fence window is not retried at once either: each try costs the users
    a window of write downtime, so it waits for the next run (Airflow's retry, a rerun)."""
    policy = ctx.spec.retry
    failures, seen = 0, _progress_mark(ctx, sid)
    while True:
        try:
            return _step(ctx, sid, phase, reason, progress)
        except Exception as exc:
            if not is_transient(exc) or isinstance(exc, (FenceWindowExceeded, ControlUnavailable)):
                raise
            now = _progress_mark(ctx, sid)
            failures = 1 if now != seen else failures + 1
            seen = now
            if failures >= policy.attempts:
                raise
            pause = min(policy.max_wait_s, policy.initial_wait_s * 2 ** (failures - 1))
            log.warning(
                "shard %s: %s interrupted (%s); again from its checkpoint in %.1f s (try %d of %d without progress)",
                sid,
                phase,
                describe(exc),
                pause,
                failures + 1,
                policy.attempts,
            )
            time.sleep(pause)
            _resolve(ctx, sid)


def _progress_mark(ctx: Context, sid: str) -> tuple[str, int]:
    """What a phase has gained so far: the shard's state and its committed batches."""
    return ctx.control.shard(sid).state.value, len(ctx.control.checkpoints(sid))


def _step(ctx: Context, sid: str, phase: str, reason: str, progress: Progress | None) -> Result:
    shard = ctx.control.shard(sid)
    state = shard.state
    d = decision(ctx, shard, phase)
    if d.verdict == Verdict.SKIP:
        if phase in EVIDENT:
            _keep_owed_evidence(ctx, sid, state)
        return Result(sid, phase, state.value, False, skipped=d.why)
    if d.verdict == Verdict.REFUSE:
        if state in (P.PURGING, P.PURGED):
            raise StateConflict(f"shard {sid} {d.why} (purge started {ctx.control.purge_started(sid)})")
        raise StateConflict(f"shard {sid} {d.why}")
    try:
        detail = RUNNERS[phase](ctx, sid, reason, progress)
    except BaseException as exc:
        record_failure(ctx, sid, phase, exc)
        raise
    shard = ctx.control.shard(sid)
    if shard.error and shard.state != P.FAILED:  # an earlier interruption's error is over
        ctx.control.keep(sid, {"event": "error cleared", "phase": phase}, error=None)
    event = "rollback" if phase == "rollback_failed" else phase
    if event in EVIDENT:
        hooks.point("moved", ctx, sid)
        _keep_evidence(ctx, sid, shard.region, shard.state, event)
    else:
        # the chain's head after every step, not only after a move: rows removed from the
        # chain's tail are then found by the audit against this head
        chain.publish_quietly(ctx.control, ctx.dsn(shard.region), sid, phase)
    return Result(sid, phase, shard.state.value, True, detail=detail)


def _keep_evidence(ctx: Context, sid: str, region: str, state: State, phase: str) -> None:
    """The signed manifest and the audit chain's head, kept in the region the move concerns.
    A failure here is logged and audited, never raised: the move has happened."""
    try:
        kept = evidence.write(ctx, sid, phase)
        if kept:
            ctx.control.record(sid, state.value, {"event": "manifest kept", "region": region, **kept})
    except Exception as exc:  # noqa: BLE001 - evidence must not undo a finished move
        log.warning("shard %s: no manifest kept in %s now: %s", sid, region, describe(exc))
        ctx.control.record(sid, state.value, {"event": "manifest not kept", "error": describe(exc)})
    chain.publish_quietly(ctx.control, ctx.dsn(region), sid, phase)


def _keep_owed_evidence(ctx: Context, sid: str, state: State) -> None:
    """A rerun of a cutover, rollback or purge whose work is done keeps the manifest its
    move is still owed: one killed between the move and its manifest, one whose region was
    away then, one completed by recovery. Like `_keep_evidence`, never raises."""
    event = OWED.get(state)
    try:
        if event is None or not evidence.owed(ctx, sid, event):
            return
    except Exception as exc:  # noqa: BLE001 - the move has happened; the next rerun looks again
        log.warning("shard %s: whether its manifest is kept could not be read now: %s", sid, describe(exc))
        return
    log.info("shard %s: its %s manifest was never kept: keeping it now", sid, event)
    _keep_evidence(ctx, sid, ctx.control.shard(sid).region, state, event)


def _resolve(ctx: Context, sid: str) -> None:
    try:
        done = recovery.resolve_shard(ctx, ctx.control.shard(sid))
        if done:
            log.warning("shard %s: %s", sid, "; ".join(done))
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("shard %s: recovery could not run yet: %s", sid, describe(exc))


def run_phase(ctx: Context, sid: str, phase: str, reason: str = "", progress: Progress | None = None) -> Result:
    """One phase of one shard, under its lock, after resolving what was left unfinished."""
    with ctx.control.lock(sid):
        _resolve(ctx, sid)
        return step(ctx, sid, phase, reason, progress)


EVIDENT = ("cutover", "rollback", "purge")  # phases after which the destination keeps the chain's head
OWED = {P.CUT_OVER: "cutover", P.ROLLED_BACK: "rollback", P.PURGED: "purge"}  # the manifest each end state is owed


def advance(ctx: Context, sid: str, through: str = "cutover", progress: Progress | None = None) -> list[Result]:
    """The forward phases in order, up to `through`, each as `decide` says."""
    with ctx.control.lock(sid):
        _resolve(ctx, sid)
        out: list[Result] = []
        for phase in FORWARD[: FORWARD.index(through) + 1]:
            out.append(step(ctx, sid, phase, progress=progress))
            if (out[-1].skipped or "").startswith(SUPERSEDED):
                break  # nothing is left for this wave to do
        return out
