"""A rolled-back shard's users are held: no later plan takes them until an operator
releases them (they may then be planned in a later wave) or moves them again in their own
wave (the shard goes back to planned). Both are explicit and audited."""

from __future__ import annotations

from migrator.control.context import Context
from migrator.control.state import State
from migrator.errors import SpecError, StateConflict


def release(ctx: Context, sid: str, reason: str) -> int:
    """Free the held users of a rolled-back shard for later waves; how many."""
    if not reason:
        raise SpecError("release needs --reason (it is recorded in the audit trail)")
    ctl = ctx.control
    with ctl.connect() as c:
        n = ctl.release(c, sid)
        ctl.audit(
            c,
            sid,
            State.ROLLED_BACK.value,
            State.ROLLED_BACK.value,
            {"event": "users released", "users": n, "reason": reason},
        )
    return n


def move_again(ctx: Context, sid: str, reason: str) -> int:
    """Plan a rolled-back shard's users again in their own wave (rolled_back -> planned);
    how many."""
    if not reason:
        raise SpecError("retry needs --reason (it is recorded in the audit trail)")
    ctl = ctx.control
    taken = ctl.superseded_by(sid)
    if taken:
        raise StateConflict(
            f"shard {sid}: its users were released and are now in {', '.join(taken)}; it cannot move them again"
        )
    with ctl.connect() as c:
        n = ctl.release(c, sid)
        ctl.transition(c, sid, State.ROLLED_BACK, State.PLANNED, {"event": "moved again", "reason": reason, "users": n})
    return n
