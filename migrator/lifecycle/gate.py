"""The one gate: whether a phase runs for a shard in a given state.

`decide(state, phase)` answers run, skip (the phase's work is already done, or there is
none for it, and the answer says so) or refuse (with the state and the next step), from
the shard's state and what the state machine keeps beside it (`finalized`, and whether a
later wave took a rolled-back shard's users); nothing else gates a phase. The dispatcher
(`dispatch`) asks it before every phase and every dry run, for every face.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from migrator.control.context import Context
from migrator.control.state import MOVED, State
from migrator.control.store import Shard

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
FORWARD = ("copy", "verify", "cutover")  # the phases that move a shard toward its new home


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
