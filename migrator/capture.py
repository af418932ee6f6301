"""Change capture and the write fence, both enforced by the databases themselves.

Design
------
Triggers, not logical decoding: they need no server configuration (wal_level, slots,
replication rights), work the same on every PostgreSQL the tool meets, capture only the
rows of users being moved, and the same trigger also enforces the fence, so a writer that
ignores the directory is refused by the database.

One BEFORE ROW trigger per table of the entity graph computes the row's owner (following
the foreign-key path, as the copy does) and then:
* if the owner is in `migrator.fenced_users` and their shard's fence in `migrator.fences`
  is up, raises SQLSTATE RMF01 ("fenced"): the write is refused and the writer may retry
  after cutover, at the user's new home;
* if the owner is in `migrator.capture_users`, appends (table, primary key, shard) to
  `migrator.changes` in the writer's own transaction, so a change is logged exactly when
  it commits.
The migrator's own apply sessions set `migrator.apply = on` and pass through both.

Triggers are installed before a shard's copy takes its first snapshot, so every change
not in a snapshot is in the log. Catch-up re-synchronises each logged primary key from the
current source row (upsert if present, delete if not), parents first and deletions
children first, in one destination transaction per pass: applying a pass twice is
harmless, so the applied position may lag what was applied.

The log is read in the order of the writers' transaction ids, never past the oldest
transaction still running (the horizon). Ids from the log's sequence are handed out in
the order writers reach the trigger, not the order they commit, so a position kept as
"the last id applied" would pass over a change whose transaction commits after a later id
was read; no transaction older than the horizon can still commit, so nothing is passed
over.

A fence waits until every transaction that began before it has ended (their changes are then in the log), bounded by
a deadline. The fence's user list is written before the window (`stage_fence`), and
raising, holding or lifting the fence is one row of `migrator.fences`, so the time the
users cannot write does not grow with the shard. After cutover the same machinery runs
the other way: destination writes are captured so a rollback can carry them back to the
source.
"""

from __future__ import annotations

import json
import logging
import time

import psycopg
from psycopg import sql
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from migrator import sqlgen
from migrator.catalog import Table
from migrator.context import Context
from migrator.control import Control
from migrator.errors import CatchUpBlocked, describe, is_transient, retrying
from migrator.spec import EntityGraph
from migrator.stores.postgres import Conn, connect, relay

log = logging.getLogger("migrator.capture")

FENCED = "RMF01"
APPLY = "SET LOCAL migrator.apply = 'on'"

DDL = """
CREATE SCHEMA IF NOT EXISTS migrator;
CREATE TABLE IF NOT EXISTS migrator.capture_users (user_key text PRIMARY KEY, shard_id text NOT NULL);
CREATE TABLE IF NOT EXISTS migrator.fenced_users (user_key text PRIMARY KEY, shard_id text NOT NULL);
CREATE INDEX IF NOT EXISTS fenced_users_shard ON migrator.fenced_users (shard_id);
CREATE TABLE IF NOT EXISTS migrator.fences (shard_id text PRIMARY KEY, until timestamptz NOT NULL);
DO $upgrade$ BEGIN
  -- A list from a version that kept each user's own `until`: its fences (e.g. a cut-over
  -- shard's, held for good) become rows of migrator.fences, so none is dropped.
  IF EXISTS (SELECT 1 FROM information_schema.columns
             WHERE table_schema = 'migrator' AND table_name = 'fenced_users' AND column_name = 'until') THEN
    INSERT INTO migrator.fences (shard_id, until)
      SELECT shard_id, max(until) FROM migrator.fenced_users GROUP BY shard_id ON CONFLICT (shard_id) DO NOTHING;
    ALTER TABLE migrator.fenced_users DROP COLUMN until;
  END IF;
END $upgrade$;
CREATE TABLE IF NOT EXISTS migrator.changes (
  id bigserial PRIMARY KEY, shard_id text NOT NULL, tbl text NOT NULL, pk jsonb NOT NULL,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  xid xid8 NOT NULL DEFAULT pg_current_xact_id()
);
"""

# A log from a version that ordered changes by id alone: its changes count as written by
# the oldest transaction, so the next catch-up applies them (once more, harmlessly). Run by
# `install` and, for a shard that is past its copy when the migrator is upgraded, by the
# first reading of the lag (every catch-up starts with one).
LOG_UPGRADE = """
DO $upgrade$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = 'migrator' AND table_name = 'changes' AND column_name = 'xid') THEN
    ALTER TABLE migrator.changes ADD COLUMN xid xid8 NOT NULL DEFAULT '1';
    ALTER TABLE migrator.changes ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
    DROP INDEX IF EXISTS migrator.changes_shard;
  END IF;
  -- created only if missing: even CREATE INDEX IF NOT EXISTS waits for the writers' locks
  IF to_regclass('migrator.changes_horizon') IS NULL THEN
    CREATE INDEX changes_horizon ON migrator.changes (shard_id, xid, id);
  END IF;
END $upgrade$;
"""
_current_logs: set[str] = set()  # servers whose log this process has seen in its current layout


def _function(graph: EntityGraph, table: Table) -> str:
    name = f"migrator.guard_{table.name}"
    pk = ", ".join(f"'{c}', {{r}}.{sql.Identifier(c).as_string(None)}" for c in table.pk)
    body = []
    for rec, ops in (("OLD", "('UPDATE', 'DELETE')"), ("NEW", "('INSERT', 'UPDATE')")):
        body.append(f"""
  IF TG_OP IN {ops} THEN
    o := {sqlgen.owner_of_record(graph, table.name, rec).as_string(None)};
    IF o IS NOT NULL THEN
      IF EXISTS (SELECT 1 FROM migrator.fenced_users f JOIN migrator.fences x ON x.shard_id = f.shard_id
                 WHERE f.user_key = o AND x.until > clock_timestamp()) THEN
        RAISE EXCEPTION 'migrator: user is fenced while their data moves; retry at their home region'
          USING ERRCODE = '{FENCED}';
      END IF;
      SELECT c.shard_id INTO s FROM migrator.capture_users c WHERE c.user_key = o;
      IF s IS NOT NULL THEN
        INSERT INTO migrator.changes (shard_id, tbl, pk)
          VALUES (s, '{table.name}', jsonb_build_object({pk.format(r=rec)}));
      END IF;
    END IF;
  END IF;""")
    return f"""
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE o text; s text;
BEGIN
  IF current_setting('migrator.apply', true) = 'on' THEN
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
  END IF;{"".join(body)}
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $fn$;
"""


def _trigger(graph: EntityGraph, table: Table) -> str:
    target = f"{sql.Identifier(graph.schema_).as_string(None)}.{sql.Identifier(table.name).as_string(None)}"
    return f"""
DROP TRIGGER IF EXISTS migrator_guard ON {target};
CREATE TRIGGER migrator_guard BEFORE INSERT OR UPDATE OR DELETE
  ON {target}
  FOR EACH ROW EXECUTE FUNCTION migrator.guard_{table.name}();
"""


def install(ctx: Context, dsn: str) -> None:
    """Idempotently create the log, the user lists and a guard trigger on every table.
    The guard functions are always replaced (that takes no lock on a table), so a guard
    installed by an earlier version follows the current rules; a table that already has
    the trigger keeps it: re-creating a trigger locks its table against the application's
    writes."""

    g = ctx.spec.entity_graph
    for attempt in retrying(ctx.spec.retry):
        with attempt, connect(dsn) as c:
            c.execute("SET LOCAL lock_timeout = '2s'")
            c.execute("SELECT pg_advisory_xact_lock(hashtext('migrator:capture'))")
            c.execute(DDL)
            c.execute(LOG_UPGRADE)
            _current_logs.add(dsn)
            have = {
                r[0]
                for r in c.execute(
                    "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE t.tgname = 'migrator_guard' AND n.nspname = %s",
                    (g.schema_,),
                )
            }
            for table in ctx.tables.values():
                c.execute(_function(g, table))
                if table.name not in have:
                    c.execute(_trigger(g, table))


def uninstall_if_unused(ctx: Context, dsn: str) -> bool:
    """Drop the triggers, functions and log when no shard needs them any more. Dropping a
    trigger locks its table against the application's writes, so a deadlock or lock
    timeout is retried rather than failing the shard."""
    for attempt in Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(10),
        wait=wait_exponential(multiplier=0.1, max=2),
        reraise=True,
    ):
        with attempt:
            return _uninstall(ctx, dsn)
    return False


def _uninstall(ctx: Context, dsn: str) -> bool:
    with connect(dsn) as c:
        c.execute("SET LOCAL lock_timeout = '2s'")
        c.execute("SELECT pg_advisory_xact_lock(hashtext('migrator:capture'))")
        if c.execute("SELECT to_regclass('migrator.capture_users')").fetchone()[0] is None:
            return True
        busy = c.execute(
            "SELECT (SELECT count(*) FROM migrator.capture_users) + (SELECT count(*) FROM migrator.fenced_users)"
        ).fetchone()[0]
        if busy:
            return False
        g = ctx.spec.entity_graph
        for table in reversed(list(ctx.tables.values())):  # children first, as writers lock them
            c.execute(
                sql.SQL("DROP TRIGGER IF EXISTS migrator_guard ON {}.{}").format(
                    sql.Identifier(g.schema_), sql.Identifier(table.name)
                )
            )
            c.execute(f"DROP FUNCTION IF EXISTS migrator.guard_{table.name}()")
        c.execute(
            "DROP TABLE IF EXISTS migrator.changes, migrator.capture_users, migrator.fenced_users, migrator.fences"
        )
    return True


def _users(conn: Conn, table: str, sid: str, members: Control) -> None:
    """The shard's users into `table`, streamed from the control database."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS rm_members (k text NOT NULL, b int NOT NULL) ON COMMIT DROP")
    members.send_members(sid, conn, "rm_members")
    # A user is in one live shard; rows left by a shard whose control state is gone are replaced.
    conn.execute(f"DELETE FROM migrator.{table} t USING rm_members m WHERE t.user_key = m.k")
    conn.execute(f"DELETE FROM migrator.{table} WHERE shard_id = %s", (sid,))
    conn.execute(f"INSERT INTO migrator.{table} (user_key, shard_id) SELECT k, %s FROM rm_members", (sid,))
    conn.execute("DROP TABLE rm_members")


RUNNING = "pg_snapshot_xip(pg_current_snapshot()) x WHERE x <> ALL(%s::text[]::xid8[])"


def _wait_for_earlier(dsn: str, deadline: float, what: str, ignore: tuple[int, ...] = ()) -> None:
    """Wait until every transaction that wrote before now has ended (but those in `ignore`,
    the migrator's own, which write none of the users' rows).

    The mark is a transaction id taken after the caller's change committed: a writer that
    wrote earlier holds an older id and is waited for; a writer's statements from now on
    see the committed change (its trigger logs or refuses them)."""
    skip = [str(x) for x in ignore]
    with connect(dsn, autocommit=True) as c:
        mark = c.execute("SELECT pg_current_xact_id()").fetchone()[0]
        while True:
            done = c.execute(
                f"SELECT NOT EXISTS (SELECT 1 FROM {RUNNING} AND x < %s::text::xid8)", (skip, str(mark))
            ).fetchone()[0]
            if done:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"transactions that began before {what} are still running")
            time.sleep(0.005)


def start_capture(ctx: Context, dsn: str, sid: str, wait_s: float | None = 300.0) -> None:
    """Log the shard's users' changes from now on; returns once no transaction that could
    have written unlogged is still running, so a snapshot taken next misses nothing
    (`wait_s=None`: where nobody writes the users' rows yet, e.g. the destination before
    the directory flips)."""
    install(ctx, dsn)
    with connect(dsn) as c:
        _users(c, "capture_users", sid, ctx.control)  # replaces the shard's earlier list
    if wait_s is not None:
        _wait_for_earlier(dsn, time.monotonic() + wait_s, "the change capture")


def stop_capture(ctx: Context, dsn: str, sid: str, *, fence_too: bool, wait: bool = True) -> None:
    """Forget the shard's lists and log on `dsn`, and drop the guards if no shard needs
    them. `wait=False` (cleaning up after a failure): one try at dropping them; a table
    locked by someone else leaves them for the next cutover or the cleanup command."""
    with connect(dsn) as c:
        if c.execute("SELECT to_regclass('migrator.capture_users')").fetchone()[0] is None:
            return
        c.execute("DELETE FROM migrator.capture_users WHERE shard_id = %s", (sid,))
        c.execute("DELETE FROM migrator.changes WHERE shard_id = %s", (sid,))
        if fence_too:
            c.execute("DELETE FROM migrator.fences WHERE shard_id = %s", (sid,))
            c.execute("DELETE FROM migrator.fenced_users WHERE shard_id = %s", (sid,))
    if wait:
        uninstall_if_unused(ctx, dsn)
        return
    try:
        _uninstall(ctx, dsn)
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("guards left on a destination for now (%s); the cleanup command removes them", describe(exc))


def stage_fence(dsn: str, sid: str, members: Control) -> None:
    """Write the list of the shard's users to fence, with the fence down: their writes still
    pass. Done before the fence window, so raising the fence is one row."""
    with connect(dsn) as c:
        c.execute("DELETE FROM migrator.fences WHERE shard_id = %s", (sid,))
        _users(c, "fenced_users", sid, members)  # replaces the shard's earlier list


def fence(dsn: str, sid: str, deadline: float, ignore: tuple[int, ...] = ()) -> None:
    """Refuse the staged users' writes from now on, then wait (until `deadline`) for every
    transaction that began earlier to end, so their changes are in the log.

    The fence expires by itself at the deadline (plus a second): a worker killed inside
    the window cannot leave users unwritable. `hold_fence` makes it permanent just before
    the directory flips."""
    remaining = max(0.0, deadline - time.monotonic()) + 1.0
    with connect(dsn) as c:
        if c.execute("SELECT 1 FROM migrator.fenced_users WHERE shard_id = %s LIMIT 1", (sid,)).fetchone() is None:
            raise RuntimeError(f"shard {sid}: no fence list staged")  # a caller's mistake, never a user's
        c.execute(
            "INSERT INTO migrator.fences (shard_id, until) VALUES (%s, clock_timestamp() + make_interval(secs => %s)) "
            "ON CONFLICT (shard_id) DO UPDATE SET until = EXCLUDED.until",
            (sid, remaining),
        )
    _wait_for_earlier(dsn, deadline, "the fence", ignore)


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
    with connect(dsn) as c:
        n = c.execute(
            "UPDATE migrator.fences SET until = 'infinity' WHERE shard_id = %s AND until > clock_timestamp()", (sid,)
        ).rowcount
        if n != 1:
            raise TimeoutError("the fence expired before it could be held")


def hold_now(dsn: str, sid: str) -> None:
    """Fence the shard's staged users for good at once (recovery: a cut-over shard's source
    must refuse its users' writes)."""
    with connect(dsn) as c:
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


Position = tuple[int, int]  # (horizon, last id): see `apply`
AFTER = "(xid, id) > (%s::text::xid8, %s)"


def lag(dsn: str, sid: str, pos: Position) -> int:
    """Changes logged for the shard past `pos` (committed ones; a running writer's are not
    seen yet). A log from an earlier version is brought up to date first."""
    with connect(dsn) as c:
        if c.execute("SELECT to_regclass('migrator.changes')").fetchone()[0] is None:
            return 0
        if dsn not in _current_logs:
            c.execute("SET LOCAL lock_timeout = '2s'")
            c.execute("SELECT pg_advisory_xact_lock(hashtext('migrator:capture'))")
            c.execute(LOG_UPGRADE)
        n = c.execute(f"SELECT count(*) FROM migrator.changes WHERE shard_id = %s AND {AFTER}", (sid, *pos)).fetchone()[
            0
        ]
    _current_logs.add(dsn)
    return n


def apply(
    ctx: Context,
    src_dsn: str,
    dst_dsn: str,
    sid: str,
    after: Position,
    limit: int = 50_000,
    timeout_ms: int | None = None,
    lock_wait_ms: int | None = None,
    ignore: tuple[int, ...] = (),
) -> tuple[Position, int]:
    """One catch-up pass from `src_dsn`'s log to `dst_dsn`; returns (position, changes).

    A pass reads, in (transaction id, id) order past `after`, the changes of transactions
    older than its snapshot's horizon: each of them has ended, so its changes are all
    visible now or never will be. With fewer than `limit` of them the new position is
    (horizon, 0); otherwise the last change read. Transactions in `ignore` (the
    migrator's own, which log nothing) do not hold the horizon back."""
    g = ctx.spec.entity_graph
    with connect(src_dsn) as src:
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        if timeout_ms is not None:
            src.execute(f"SET LOCAL statement_timeout = {max(1, timeout_ms)}")
        if lock_wait_ms is not None:
            src.execute(f"SET LOCAL lock_timeout = {max(1, lock_wait_ms)}")
        horizon = src.execute(
            f"SELECT coalesce((SELECT min(x) FROM {RUNNING}), pg_snapshot_xmax(pg_current_snapshot()))::text::bigint",
            ([str(x) for x in ignore],),
        ).fetchone()[0]
        rows = src.execute(
            f"SELECT id, tbl, pk, xid::text::bigint FROM migrator.changes WHERE shard_id = %s AND {AFTER} "
            "AND xid < %s::text::xid8 ORDER BY xid, id LIMIT %s",
            (sid, *after, horizon, limit),
        ).fetchall()
        pos = (rows[-1][3], rows[-1][0]) if len(rows) == limit else (max(horizon, after[0]), 0)
        if not rows:
            return pos, 0
        distinct: dict[str, dict[str, dict]] = {}
        for _, tbl, pk, _ in rows:  # each key once, however often it changed
            distinct.setdefault(tbl, {})[json.dumps(pk, sort_keys=True)] = pk
        by_table = {t: list(keys.values()) for t, keys in distinct.items()}
        order = [t for t in ctx.tables if t in by_table]
        with connect(dst_dsn) as dst:
            dst.execute(APPLY)
            if timeout_ms is not None:
                dst.execute(f"SET LOCAL statement_timeout = {max(1, timeout_ms)}")
            if lock_wait_ms is not None:
                dst.execute(f"SET LOCAL lock_timeout = {max(1, lock_wait_ms)}")
            for name in order:  # parents first: upsert what the source has now
                t = ctx.tables[name]
                ident = sql.SQL("{}.{}").format(sql.Identifier(g.schema_), sql.Identifier(name))
                pkcols = sql.SQL(", ").join(sql.Identifier(c) for c in t.pk)
                cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in t.columns)
                stage = sql.Identifier(f"rm_stage_{name}")
                dst.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DROP").format(stage, ident))
                sel = sql.SQL(
                    "SELECT {} FROM {} t0 JOIN jsonb_populate_recordset(NULL::{}, %(pks)s::jsonb) k USING ({})"
                ).format(
                    sql.SQL(", ").join(sql.SQL("t0.{}").format(sql.Identifier(c.name)) for c in t.columns),
                    ident,
                    ident,
                    pkcols,
                )
                with (
                    src.cursor().copy(
                        sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(sel), {"pks": json.dumps(by_table[name])}
                    ) as out,
                    dst.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(stage, cols)) as inp,
                ):
                    relay(out, inp)
                others = [c.name for c in t.columns if c.name not in t.pk]
                action = (
                    sql.SQL("DO NOTHING")
                    if not others
                    else sql.SQL("DO UPDATE SET {}").format(
                        sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in others)
                    )
                )
                dst.execute(
                    sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) {}").format(
                        ident, cols, cols, stage, pkcols, action
                    )
                )
            for name in reversed(order):  # children first: delete what the source no longer has
                t = ctx.tables[name]
                ident = sql.SQL("{}.{}").format(sql.Identifier(g.schema_), sql.Identifier(name))
                match = sql.SQL(" AND ").join(sql.SQL("d.{0} = k.{0}").format(sql.Identifier(c)) for c in t.pk)
                smatch = sql.SQL(" AND ").join(sql.SQL("s.{0} = k.{0}").format(sql.Identifier(c)) for c in t.pk)
                dst.execute(
                    sql.SQL(
                        "DELETE FROM {} d USING jsonb_populate_recordset(NULL::{}, %(pks)s::jsonb) k WHERE {} "
                        "AND NOT EXISTS (SELECT 1 FROM {} s WHERE {})"
                    ).format(ident, ident, match, sql.Identifier(f"rm_stage_{name}"), smatch),
                    {"pks": json.dumps(by_table[name])},
                )
        src.rollback()
    return pos, len(rows)


def catch_up(
    ctx: Context,
    sid: str,
    src_dsn: str,
    dst_dsn: str,
    direction: str,
    *,
    until: int = 0,
    deadline: float | None = None,
    ignore: tuple[int, ...] = (),
) -> int:
    """Apply passes until at most `until` changes are pending; returns changes applied.
    (With `until` = 0 outside a fence, a writer that never pauses would keep it going.)

    Changes of transactions newer than the oldest one still writing wait for it (see
    `apply`): a long transaction on the log's server holds the catch-up back until it ends,
    as it holds a fence. Inside a fence the window bounds every wait. Outside one, a pass
    waits at most `changes.lock_wait_s` for a lock another transaction holds on either side
    (a long migration of a table, say), then gives up with a transient error rather than
    wait on."""
    ctl = ctx.control
    pos = ctl.position(sid, direction)
    applied = 0
    lock_wait_s = ctx.spec.changes.lock_wait_s
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("catch-up did not finish inside the fence window")
        if lag(src_dsn, sid, pos) <= until:
            return applied
        ms = None if deadline is None else int((deadline - time.monotonic()) * 1000)
        try:
            pos, n = apply(
                ctx,
                src_dsn,
                dst_dsn,
                sid,
                pos,
                timeout_ms=ms,
                ignore=ignore,
                lock_wait_ms=None if deadline is not None else int(lock_wait_s * 1000),
            )
        except psycopg.errors.LockNotAvailable:
            if deadline is not None:
                raise
            raise CatchUpBlocked(
                f"shard {sid}: catch-up ({direction}) waited over {lock_wait_s} s for a lock "
                "another transaction holds on a table of the graph; retried later"
            ) from None
        ctl.set_position(sid, direction, pos)
        applied += n
        if n == 0:  # what is pending waits for an older transaction to end
            time.sleep(0.005 if deadline is not None else 0.05)


def _span(after: Position | None, upto: Position | None) -> tuple[str, tuple]:
    """SQL and arguments for the changes past `after` and up to `upto` (either may be open)."""
    cond, args = "", ()  # type: tuple[str, tuple[int, ...]]
    if after is not None:
        cond, args = f" AND {AFTER}", tuple(after)
    if upto is not None:
        cond, args = cond + " AND NOT " + AFTER, args + tuple(upto)
    return cond, args


def touched(dsn: str, sid: str, after: Position | None = None) -> set[tuple[str, tuple]]:
    """(table, primary key values as text) of every change logged for the shard (past `after`)."""
    cond, args = _span(after, None)
    with connect(dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass('migrator.changes')").fetchone()[0] is None:
            return set()
        rows = c.execute(
            f"SELECT DISTINCT tbl, pk FROM migrator.changes WHERE shard_id = %s{cond}", (sid, *args)
        ).fetchall()
    return {(t, tuple(sorted((k, str(v)) for k, v in pk.items()))) for t, pk in rows}


def finalize(ctx: Context, sid: str, src_dsn: str, dst_dsn: str) -> None:
    """A cut-over shard that will not be rolled back: stop capturing on both sides. The
    source fence stays, so the moved users' source rows remain read-only until purged."""
    with connect(src_dsn) as c:
        if c.execute("SELECT to_regclass('migrator.capture_users')").fetchone()[0] is not None:
            c.execute("DELETE FROM migrator.capture_users WHERE shard_id = %s", (sid,))
            c.execute("DELETE FROM migrator.changes WHERE shard_id = %s", (sid,))
    stop_capture(ctx, dst_dsn, sid, fence_too=True)
    uninstall_if_unused(ctx, src_dsn)


def touched_keys(
    dsn: str, sid: str, after: Position | None = None, upto: Position | None = None
) -> dict[str, list[dict]]:
    """Table -> primary keys (as logged) of every change logged for the shard (past `after`, up to `upto`)."""
    cond, args = _span(after, upto)
    with connect(dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass('migrator.changes')").fetchone()[0] is None:
            return {}
        rows = c.execute(
            f"SELECT DISTINCT tbl, pk FROM migrator.changes WHERE shard_id = %s{cond}", (sid, *args)
        ).fetchall()
    out: dict[str, list[dict]] = {}
    for t, pk in rows:
        out.setdefault(t, []).append(pk)
    return out
