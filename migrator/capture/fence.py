"""The write fence: staged, raised for a bounded window, held for good at cutover, lifted;
and the guard a rollback leaves at the region its users left."""

from __future__ import annotations

import time

from psycopg import sql

from migrator.capture.triggers import wait_for_earlier, write_users
from migrator.control.store import Control
from migrator.stores.postgres import Conn, connect, send


def stage_fence(dsn: str, sid: str, members: Control, not_homed_at: str | None = None) -> None:
    """Write the list of the shard's users to fence, with the fence down: their writes still
    pass. Done before the fence window, so raising the fence is one row. Users the
    directory homes at `not_homed_at` are left out (recovery: those a later shard took back
    to the shard's origin)."""
    with connect(dsn) as c:
        c.execute("DELETE FROM migrator.fences WHERE shard_id = %s", (sid,))
        write_users(c, "fenced_users", sid, members, not_homed_at)  # replaces the shard's earlier list


def fence(dsn: str, sid: str, deadline: float, ignore: tuple[int, ...] = ()) -> None:
    """Refuse the staged users' writes from now on, then wait (until `deadline`) for every
    transaction that began earlier to end, so their changes are in the log.

    The fence expires by itself at the deadline (plus a second): a worker killed inside
    the window cannot leave users unwritable. `hold_fence` makes it permanent just before
    the directory flips."""
    remaining = max(0.0, deadline - time.monotonic()) + 1.0
    with connect(dsn, autocommit=True) as c:  # one statement: the fence may be an ocean away
        raised = c.execute(
            "INSERT INTO migrator.fences (shard_id, until) SELECT %s, clock_timestamp() + make_interval(secs => %s) "
            "WHERE EXISTS (SELECT 1 FROM migrator.fenced_users WHERE shard_id = %s) "
            "ON CONFLICT (shard_id) DO UPDATE SET until = EXCLUDED.until RETURNING 1",
            (sid, remaining, sid),
        ).fetchone()
    if raised is None:
        raise RuntimeError(f"shard {sid}: no fence list staged")  # a caller's mistake, never a user's
    wait_for_earlier(dsn, deadline, "the fence", ignore)


def own_transaction(dsn: str, conn: Conn) -> tuple[int, ...]:
    """The id of `conn`'s open transaction when `dsn` is on the same server (the control
    database beside the source, say), so waits on `dsn` for older transactions can leave it
    out; empty otherwise. Recognised by its backend's pid and transaction id both."""
    pid = conn.info.backend_pid
    xid, short = conn.execute("SELECT pg_current_xact_id()::text, pg_current_xact_id()::xid::text").fetchone()
    with connect(dsn, autocommit=True) as c:
        same = c.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s AND backend_xid::text = %s)", (pid, short)
        ).fetchone()[0]
    return (int(xid),) if same else ()


def hold_fence(dsn: str, sid: str) -> None:
    """Make the shard's fence permanent (after cutover the source stays read-only)."""
    with connect(dsn, autocommit=True) as c:
        n = c.execute(
            "UPDATE migrator.fences SET until = 'infinity' WHERE shard_id = %s AND until > clock_timestamp()", (sid,)
        ).rowcount
        if n != 1:
            raise TimeoutError("the fence expired before it could be held")


def hold_now(dsn: str, sid: str) -> None:
    """Fence the shard's staged users for good at once (recovery: a cut-over shard's source
    must refuse its users' writes)."""
    with connect(dsn, autocommit=True) as c:
        c.execute(
            "INSERT INTO migrator.fences (shard_id, until) VALUES (%s, 'infinity') "
            "ON CONFLICT (shard_id) DO UPDATE SET until = EXCLUDED.until",
            (sid,),
        )


HELD, UP, EXPIRED = "held", "up", "expired"


def fences(dsn: str, sid: str | None = None) -> dict[str, str]:
    """Shard -> its fence on `dsn`: held (for good), up (until its expiry) or expired."""
    with connect(dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass('migrator.fences')").fetchone()[0] is None:
            return {}
        rows = c.execute(
            "SELECT shard_id, until = 'infinity', until > clock_timestamp() FROM migrator.fences"
            + (" WHERE shard_id = %s" if sid else ""),
            (sid,) if sid else (),
        ).fetchall()
    return {s: HELD if held else UP if up else EXPIRED for s, held, up in rows}


def lift(dsn: str, sid: str) -> None:
    with connect(dsn) as c:
        if c.execute("SELECT to_regclass('migrator.fences')").fetchone()[0] is not None:
            c.execute("DELETE FROM migrator.fences WHERE shard_id = %s", (sid,))
        if c.execute("SELECT to_regclass('migrator.fenced_users')").fetchone()[0] is not None:
            c.execute("DELETE FROM migrator.fenced_users WHERE shard_id = %s", (sid,))


def depart(dsn: str, sid: str) -> int:
    """After a rollback's flip back: the users the destination fenced for it are homed
    elsewhere now, and the destination refuses their writes for good (until `arrive`), an
    INSERT of a new row included. Called while the rollback's fence is still held, so the
    guard never lapses; how many users."""
    with connect(dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass('migrator.departed')").fetchone()[0] is None:
            return 0  # nothing was captured or fenced there: the shard never cut over
        return c.execute(
            "INSERT INTO migrator.departed (user_key, shard_id) SELECT user_key, shard_id FROM migrator.fenced_users "
            "WHERE shard_id = %s ON CONFLICT (user_key) DO UPDATE SET shard_id = EXCLUDED.shard_id, "
            "since = clock_timestamp()",
            (sid,),
        ).rowcount


def arrive(dsn: str, sid: str) -> int:
    """At a cutover's decision: the shard's users are homed at this destination from now
    on, so what refuses them here goes (they are the users whose changes are logged here
    for the shard): a guard an earlier rollback left, and the held fence of an earlier
    move of theirs away from here (a move back); how many. One message: it runs inside the
    cutover's window, at a destination that may be an ocean away."""
    with connect(dsn, autocommit=True) as c:
        shard = sql.Literal(sid).as_string(c)
        said = send(
            c,
            "BEGIN; "
            "DELETE FROM migrator.departed d USING migrator.capture_users u "
            f"WHERE u.shard_id = {shard} AND d.user_key = u.user_key; "
            "DELETE FROM migrator.fenced_users f USING migrator.capture_users u "
            f"WHERE u.shard_id = {shard} AND f.user_key = u.user_key AND f.shard_id <> u.shard_id; "
            "COMMIT",
        )
    return sum(s.rowcount for s in said if s.status.startswith("DELETE"))
