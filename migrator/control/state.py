"""A shard's phases and the one table of moves allowed between them."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    PLANNED = "planned"
    COPYING = "copying"
    COPIED = "copied"
    VERIFIED = "verified"
    CUT_OVER = "cut_over"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    PURGING = "purging"
    PURGED = "purged"


P = State

# A move not listed here is refused. COPYING -> COPYING is a resume after a crash (the
# shard's advisory lock guarantees the previous worker is gone); ROLLED_BACK -> PLANNED
# is an operator's explicit, audited choice to move the held users again in their own
# wave (`migrator retry`). Rollback is reachable from every state but rolled_back and the
# purge's: once the source copy starts to go, moving the users back is a new migration.
TRANSITIONS: dict[State, frozenset[State]] = {
    P.PLANNED: frozenset({P.COPYING, P.FAILED, P.ROLLING_BACK}),
    P.COPYING: frozenset({P.COPYING, P.COPIED, P.FAILED, P.ROLLING_BACK}),
    P.COPIED: frozenset({P.COPYING, P.VERIFIED, P.FAILED, P.ROLLING_BACK}),
    P.VERIFIED: frozenset({P.COPYING, P.CUT_OVER, P.FAILED, P.ROLLING_BACK}),
    P.CUT_OVER: frozenset({P.ROLLING_BACK, P.PURGING}),
    P.FAILED: frozenset({P.COPYING, P.ROLLING_BACK}),
    P.ROLLING_BACK: frozenset({P.ROLLING_BACK, P.ROLLED_BACK}),
    P.ROLLED_BACK: frozenset({P.PLANNED}),
    P.PURGING: frozenset({P.PURGING, P.PURGED}),
    P.PURGED: frozenset(),
}

# The users are homed at the destination: the source fence stays held in these states.
MOVED = frozenset({P.CUT_OVER, P.PURGING, P.PURGED})

# A move under way: its users are in no other shard until it cuts over or is rolled back.
IN_FLIGHT = frozenset({P.PLANNED, P.COPYING, P.COPIED, P.VERIFIED, P.FAILED, P.ROLLING_BACK})


def allowed(src: State, dst: State) -> bool:
    return dst in TRANSITIONS[src]
