"""The one place that says whether a phase runs for a shard, and what a failure means.

`decide(state, phase)` answers run, skip (the phase's work is already done, or there is
none for it, and the answer says so) or refuse (with the state and the next step), from
the shard's state and what the state machine keeps beside it (`finalized`); nothing else
gates a phase. A dry run asks the same question, then the phase's dry implementation
(`DRY_RUNS`) says what it would do, writing nothing. The command line, the
engine's `run` and every Airflow task go through `run_phase`/`advance`, which take the
shard's lock, resolve what a killed cutover or rollback left unfinished (`recovery`), ask
`decide`, run the phase, and classify a failure once:

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
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from migrator import hooks
from migrator.capture import recovery
from migrator.control import holds
from migrator.control.context import Context
from migrator.control.state import MOVED, State, allowed
from migrator.control.store import Shard
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


class Verdict(StrEnum):
    RUN = "run"
    SKIP = "skip"
    REFUSE = "refuse"


PHASES = (
    "copy", "verify", "recheck", "cutover", "rollback", "rollback_failed", "cleanup", "release", "retry", "purge"
)  # fmt: skip
# The states each phase runs from, and those in which its work is already done.
RUNS: dict[str, frozenset[State]] = {
    "copy": frozenset({P.PLANNED, P.COPYING, P.FAILED}),
    "verify": frozenset({P.COPIED}),
    "recheck": frozenset({P.VERIFIED, P.CUT_OVER}),
    "cutover": frozenset({P.VERIFIED}),
    "rollback": frozenset(set(P) - {P.ROLLED_BACK, P.PURGING, P.PURGED}),
    # the DAG's automatic rollback: only a shard that failed for good; one that a transient
    # outage stopped keeps its checkpoint and resumes when its task is cleared
    "rollback_failed": frozenset({P.FAILED}),
    "cleanup": frozenset({P.CUT_OVER, P.ROLLED_BACK}),
    "release": frozenset({P.ROLLED_BACK}),
    "retry": frozenset({P.ROLLED_BACK}),
    "purge": frozenset({P.CUT_OVER, P.PURGING}),
}
DONE: dict[str, frozenset[State]] = {
    "copy": frozenset({P.COPIED, P.VERIFIED, *MOVED}),
    "verify": frozenset({P.VERIFIED, *MOVED}),
    "cutover": frozenset(MOVED),
    "rollback": frozenset({P.ROLLED_BACK}),
    "rollback_failed": frozenset(set(P) - {P.FAILED}),
    "cleanup": frozenset({P.PURGED}),
    "purge": frozenset({P.PURGED}),
}
NEXT_STEP: dict[State, str] = {
    P.PLANNED: "copy it first (migrator copy)",
    P.COPYING: "finish its copy (migrator copy resumes it)",
    P.COPIED: "verify it first (migrator verify)",
    P.VERIFIED: "cut it over (migrator cutover) or roll it back",
    P.CUT_OVER: "roll it back first (migrator rollback) if it must move again",
    P.FAILED: "resume it (migrator copy, then verify) once the cause is fixed, or roll it back",
    P.ROLLING_BACK: "finish the rollback (migrator rollback)",
    P.ROLLED_BACK: "its users are held; move them again with migrator retry, or release them with migrator release",
    P.PURGING: "finish the purge (migrator purge resumes it); it can no longer be rolled back",
    P.PURGED: "none: its source copy is retired, the point of no return; moving its users back is a new "
    "migration from their region",
}


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    why: str


FINALIZED = (
    "is cut_over and was finalized: writes at its new home are no longer captured, so a rollback could lose "
    "them; next: none (moving its users back is a new migration from their region)"
)


SUPERSEDED = "superseded"


def decide(state: State, phase: str, finalized: bool = False, superseded: bool = False) -> Decision:
    """The answer for a shard in `state`: `finalized` when cleanup removed its capture,
    `superseded` when a rolled-back shard's users were released and a later wave took them."""
    if phase not in RUNS:
        raise ValueError(f"unknown phase {phase!r}")
    if superseded and state == P.ROLLED_BACK and phase in FORWARD:
        return Decision(Verdict.SKIP, f"{SUPERSEDED}: its users were released and a later wave moves them")
    if finalized and state == P.CUT_OVER:
        if phase in ("rollback", "rollback_failed"):
            return Decision(Verdict.REFUSE, FINALIZED)
        if phase == "cleanup":
            return Decision(Verdict.SKIP, "already finalized: nothing to cleanup")
    if state in RUNS[phase]:
        return Decision(Verdict.RUN, f"{phase} runs on a {state} shard")
    if state in DONE.get(phase, frozenset()):
        if phase == "rollback_failed":
            return Decision(
                Verdict.SKIP,
                f"{state}: not failed for good, so it resumes rather than rolls back "
                "(clear its failed task to resume it)",
            )
        return Decision(Verdict.SKIP, f"already {state}: nothing to {phase}")
    return Decision(Verdict.REFUSE, f"is {state}, so it cannot {phase}; next: {NEXT_STEP[state]}")


def decision(ctx: Context, shard: Shard, phase: str) -> Decision:
    """`decide` for the shard as the control database keeps it."""
    finalized = shard.finalized and ctx.spec.changes.capture  # without capture, cleanup removes nothing
    superseded = shard.state == P.ROLLED_BACK and phase in FORWARD and bool(ctx.control.superseded_by(shard.shard_id))
    return decide(shard.state, phase, finalized, superseded)


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
    return DRY_RUNS[phase](ctx, sid)


@dataclass
class Result:
    shard_id: str
    phase: str
    state: str
    ran: bool
    skipped: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shard_id": self.shard_id, "phase": self.phase, "state": self.state, "ran": self.ran}
        if self.skipped:
            out["skipped"] = self.skipped
        out.update(self.detail)
        return out


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
    return {"deleted": r.get("deleted", {}), "objects_deleted": r.get("objects_deleted", 0)}


def _cleanup(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    return cleanup_shard(ctx, sid)


def _purge(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    return purge_shard(ctx, sid, progress=progress)


def _release(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    return holds.release(ctx, sid, reason)


def _retry(ctx: Context, sid: str, reason: str, progress: Progress | None) -> dict[str, Any]:
    return holds.move_again(ctx, sid, reason)


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
DRY_RUNS: dict[str, Callable[[Context, str], dict[str, Any]]] = {"purge": purge_preview}


def record_failure(ctx: Context, sid: str, phase: str, exc: BaseException) -> None:
    """The one classification of a phase's failure (see the module's docstring)."""
    if isinstance(exc, (SpecError, StateConflict, PurgeRefused)) or not isinstance(exc, Exception):
        return
    ctl = ctx.control
    what = describe(exc)
    try:
        state = ctl.shard(sid).state
        if is_transient(exc):
            ctl.record(sid, state.value, {"event": f"{phase} interrupted", "error": what, "resumable": True})
            return
        detail: dict[str, Any] = {"event": f"{phase} failed", "error": what}
        if isinstance(exc, ChecksumMismatch):
            detail["named"] = exc.differences[:50]
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
    event = "rollback" if phase == "rollback_failed" else phase
    if event in EVIDENT:
        hooks.point("moved", ctx, sid)
        _keep_evidence(ctx, sid, shard.region, shard.state, event)
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


FORWARD = ("copy", "verify", "cutover")
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
