"""The ownership directory: which region is each user's home, and the one way a shard's
users change home (every user of the shard at once, epoch + 1, in the caller's control
transaction)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from migrator.control.context import Context
from migrator.control.state import State
from migrator.control.store import SCHEMA
from migrator.errors import StateConflict
from migrator.stores.postgres import Conn

# The application name of a session while its directory flip is open.
FLIP_SESSION = "residency-migrator-flip"


def move_homes(conn: Conn, sid: str, frm: str, to: str) -> int:
    """Flip the shard's users homed at `frm` to `to` (epoch + 1); the number flipped."""
    return conn.execute(
        f"UPDATE {SCHEMA}.directory d SET home = %s, epoch = d.epoch + 1, updated_at = now() "
        f"FROM {SCHEMA}.shard_user su WHERE su.shard_id = %s AND su.user_key = d.user_key AND d.home = %s",
        (to, sid, frm),
    ).rowcount


class Flip:
    """A cutover's directory flip, open in `conn` until the block of `prepared_flip` ends."""

    def __init__(self, ctx: Context, conn: Conn, sid: str, region: str, digest: str, users: int, flipped: int):
        self.ctx, self.conn, self.sid = ctx, conn, sid
        self.region, self.digest, self.users, self.flipped = region, digest, users, flipped

    def bound(self, seconds: float) -> None:
        """From now on the server ends the flip's session if its worker falls silent for
        `seconds` inside the transaction (a lost host, a cut link): the flip is rolled back
        and its locks go, and `recover` resolves the shard. Set as the fence window opens;
        before it the flip may wait on a long compare."""
        silent_at_most(self.conn, seconds)

    def finish(self, detail: dict) -> None:
        """The shard's move to cut_over, in the flip's transaction (committed by the caller's block)."""
        self.ctx.control.transition(
            self.conn,
            self.sid,
            State.VERIFIED,
            State.CUT_OVER,
            {"event": "cutover", "users": self.users, "to": self.region, "digest": self.digest, **detail},
            digest=self.digest,
        )


def silent_at_most(conn: Conn, seconds: float) -> None:
    """The server ends this transaction's session once it is idle in it for `seconds`."""
    conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, true)", (f"{int(seconds * 1000)}ms",))


@contextlib.contextmanager
def prepared_flip(ctx: Context, sid: str) -> Iterator[Flip]:
    """Flip the shard's users' homes to its region in a transaction that commits when the
    block ends without error (after `finish`) and is rolled back otherwise. The shard's row
    is locked throughout: only a verified shard whose users are all still homed at its
    origin is flipped."""
    ctl = ctx.control
    with ctl.connect() as c:
        # Named for as long as it is open, so that every fence's wait for earlier transactions
        # leaves out every open flip (`capture.triggers.RUNNING`), not only its own: flips of
        # other shards go on at once without waiting on each other. A flip writes the control
        # database alone, never a user's row.
        c.execute(f"SET LOCAL application_name = '{FLIP_SESSION}'")
        row = c.execute(
            # NO KEY UPDATE: rows that refer to the shard (catch-up positions) can still be written
            f"SELECT state, digest, region, users, coalesce(origin, %s) FROM {SCHEMA}.shard "
            "WHERE shard_id = %s FOR NO KEY UPDATE",
            (ctx.spec.source_region, sid),
        ).fetchone()
        if row is None:
            raise StateConflict(f"shard {sid} does not exist")
        state, digest, region, users, origin = row
        if state != State.VERIFIED.value or not digest:
            raise StateConflict(f"shard {sid} is {state}; only a verified shard can be cut over")
        flipped = move_homes(c, sid, origin, region)
        if flipped != users:
            raise StateConflict(
                f"shard {sid}: {users - flipped} of its {users} users are no longer homed at {origin}; cutover refused"
            )
        yield Flip(ctx, c, sid, region, digest, users, flipped)


def flip(ctx: Context, sid: str, detail: dict) -> int:
    """Flip a verified shard's users in one transaction; the number flipped."""
    with prepared_flip(ctx, sid) as f:
        f.finish(detail)
    return f.flipped


def flip_back(ctx: Context, sid: str, state: State, region: str, origin: str, detail: dict) -> int:
    """A rollback's move to rolling_back, with the shard's users homed at its origin again
    when it was cut over, in one control transaction; the number flipped back."""
    ctl = ctx.control
    with ctl.connect() as c:
        silent_at_most(c, ctx.spec.changes.dead_session_s)  # a lost worker holds its locks this long at most
        flipped = move_homes(c, sid, region, origin) if state == State.CUT_OVER else 0
        ctl.transition(c, sid, state, State.ROLLING_BACK, {**detail, "directory_flipped_back": flipped})
    return flipped
