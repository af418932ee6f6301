"""Removes what change capture installed for a finished shard."""

from __future__ import annotations

from migrator import capture
from migrator.control.context import Context
from migrator.control.state import State
from migrator.control.store import NOW


def cleanup_shard(ctx: Context, sid: str) -> bool:
    """A cut-over shard stops being captured (it can then no longer be rolled back; its
    fence at its origin stays); a rolled-back shard loses its lists and fences on both sides.
    Whether it finalized a cut-over shard."""
    ctl = ctx.control
    shard = ctl.shard(sid)
    src, dst = ctx.origin_dsn(shard), ctx.dsn(shard.region)
    if shard.state == State.CUT_OVER:
        capture.finalize(ctx, sid, src, dst)
        ctl.keep(sid, {"event": "finalized"}, finalized_at=NOW)
        return True
    for dsn in (src, dst):
        capture.stop_capture(ctx, dsn, sid, fence_too=True)
    return False
