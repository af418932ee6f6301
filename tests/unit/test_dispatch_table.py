"""The dispatcher's table against the state machine's: a phase runs only where the move it
makes is allowed, and is refused where it is not; cleanup's finalization and a later
wave's taking of released users are answered by `decide` too."""

from __future__ import annotations

import pytest

from migrator.control.state import TRANSITIONS, State, allowed
from migrator.lifecycle.gate import PHASES, RUNS, Verdict, decide

P = State
# the first move each phase makes from the state it runs in (none: it moves no state)
MAKES: dict[str, set[State]] = {
    "copy": {P.COPYING},
    "verify": {P.VERIFIED},
    "recheck": set(),
    "cutover": {P.CUT_OVER},
    "rollback": {P.ROLLING_BACK},
    "rollback_failed": {P.ROLLING_BACK},
    "cleanup": set(),
    "release": set(),
    "retry": {P.PLANNED},
    "purge": {P.PURGING},
}


def test_every_phase_is_in_the_table():
    assert set(MAKES) == set(PHASES) == set(RUNS)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("state", list(State))
def test_a_phase_runs_where_its_move_is_allowed_and_is_refused_where_it_is_not(state, phase):
    d = decide(state, phase)
    moves = {t for t in MAKES[phase] if allowed(state, t)}
    if d.verdict == Verdict.RUN and MAKES[phase]:
        assert moves, f"{phase} runs on {state}, but the state machine allows none of {MAKES[phase]}"
    if d.verdict == Verdict.REFUSE:
        assert not moves, f"{phase} is refused on {state}, though the state machine allows {moves}"
        assert str(state) in d.why and "next:" in d.why


def test_every_move_but_a_failure_is_some_phases():
    made = {t for ts in MAKES.values() for t in ts} | {P.COPIED, P.ROLLED_BACK, P.PURGED}  # each phase's last move
    for src, dsts in TRANSITIONS.items():
        assert dsts - {P.FAILED} <= made, (src, dsts - made)


def test_a_finalized_shard_cannot_be_rolled_back_and_is_not_cleaned_up_twice():
    for phase in ("rollback", "rollback_failed"):
        d = decide(P.CUT_OVER, phase, finalized=True)
        assert d.verdict == Verdict.REFUSE and "finalized" in d.why and "next:" in d.why
    assert decide(P.CUT_OVER, "cleanup", finalized=True).verdict == Verdict.SKIP
    assert decide(P.CUT_OVER, "purge", finalized=True).verdict == Verdict.RUN
    assert decide(P.CUT_OVER, "rollback").verdict == Verdict.RUN


def test_a_released_shard_a_later_wave_took_is_skipped_by_its_own_waves_run():
    for phase in ("copy", "verify", "cutover"):
        assert decide(P.ROLLED_BACK, phase, superseded=True).verdict == Verdict.SKIP
        assert decide(P.ROLLED_BACK, phase).verdict == Verdict.REFUSE
    assert decide(P.ROLLED_BACK, "retry", superseded=True).verdict == Verdict.RUN


def test_the_automatic_rollback_acts_on_a_failed_shard_only():
    for state in State:
        want = Verdict.RUN if state == P.FAILED else Verdict.SKIP
        assert decide(state, "rollback_failed").verdict == want, state
