"""Hands a verified shard's users to their new region in the ownership directory.

The check that the shard is verified and the flip of every user's home (epoch + 1) are
one transaction in the control database: a shard that was not verified, or whose users
are no longer all at the source, cannot be cut over, and a half-flipped shard cannot exist.
The source rows stay until a later purge.
"""
from __future__ import annotations

from migrator.context import Context
from migrator.control import SCHEMA
from migrator.errors import StateConflict
from migrator.state import Phase


def cutover_shard(ctx: Context, sid: str) -> int:
    """Flip the shard's users; returns how many directory rows changed."""
    ctl = ctx.control
    with ctl.connect() as c:
        row = c.execute(
            f"SELECT state, digest, region, users FROM {SCHEMA}.shard WHERE shard_id = %s FOR UPDATE", (sid,)
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
            c.rollback()
            raise StateConflict(
                f"shard {sid}: {users - flipped} of its {users} users are no longer homed at "
                f"{ctx.spec.source_region}; cutover refused"
            )
        ctl.transition(c, sid, Phase.VERIFIED, Phase.CUT_OVER,
                       {"event": "cutover", "users": users, "to": region, "digest": digest})
    return flipped
