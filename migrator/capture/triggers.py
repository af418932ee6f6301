"""Guard triggers: installed per table of the graph, they log the changes of the users
being moved and refuse the writes of fenced users (see the package's docstring)."""

from __future__ import annotations

import logging
import time

from psycopg import sql

from migrator.control.context import Context
from migrator.control.directory import FLIP_SESSION
from migrator.control.store import Control
from migrator.errors import SpecError, describe
from migrator.schema import history
from migrator.spec import EntityGraph
from migrator.stores import is_transient, sqlgen
from migrator.stores.catalog import Table
from migrator.stores.postgres import Conn, connect, send

log = logging.getLogger("migrator.capture")

FENCED = "RMF01"
APPLY = "SET LOCAL migrator.apply = 'on'"
# When a guard fires: checked by the trigger itself, before any function is called, so
# the migrator's own bulk writes (the copy's apply, a rollback, a purge) skip the PL/pgSQL
# call per row, a third of such a statement's time. The function checks it too, for
# triggers created before.
FIRES_FOR = "current_setting('migrator.apply', true) IS DISTINCT FROM 'on'"

logs_at_head: set[str] = set()  # servers whose log this process has seen at its schema head


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
      IF EXISTS (SELECT 1 FROM migrator.departed d WHERE d.user_key = o) THEN
        RAISE EXCEPTION 'migrator: user is homed in another region; retry at their home region'
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
CREATE TRIGGER migrator_guard BEFORE INSERT OR UPDATE OR DELETE
  ON {target}
  FOR EACH ROW WHEN ({FIRES_FOR})
  EXECUTE FUNCTION migrator.guard_{table.name}();
"""


def install(ctx: Context, dsn: str) -> None:
    """Idempotently create the log, the user lists and a guard trigger on every table.
    The guard functions are always replaced (that takes no lock on a table), so a guard
    installed by an earlier version follows the current rules; a table that already has
    the trigger keeps it: re-creating a trigger locks its table against the application's
    writes."""

    history.ensure(dsn, history.CAPTURE)
    logs_at_head.add(dsn)
    _guards(ctx, dsn)


def _guards(ctx: Context, dsn: str) -> None:
    """Every guard function replaced and every missing trigger created, under the capture's
    lock, in one message: one round trip to a store that may be an ocean away."""
    g = ctx.spec.entity_graph
    with connect(dsn, autocommit=True) as c:
        schema = sql.Literal(g.schema_).as_string(c)
        parts = ["BEGIN", "SET LOCAL lock_timeout = '2s'", "SELECT pg_advisory_xact_lock(hashtext('migrator:capture'))"]
        for table in ctx.tables.values():
            parts.append(_function(g, table).strip().rstrip(";"))
            name = sql.Literal(table.name).as_string(c)
            create = _trigger(g, table).strip()
            parts.append(
                "DO $tg$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                f"WHERE t.tgname = 'migrator_guard' AND n.nspname = {schema} AND c.relname = {name}) "
                f"THEN {create} END IF; END$tg$"
            )
        parts.append("COMMIT")
        send(c, ";\n".join(parts))


def uninstall_if_unused(ctx: Context, dsn: str) -> bool:
    """Drop the triggers, functions and log when no shard needs them any more. Dropping a
    trigger locks its table against the application's writes; a deadlock or lock timeout
    is transient, and the phase's retry tries again. Whether none is left."""
    return _retire(ctx, dsn, None, fence_too=False, wait=True)


# What no shard needing the guards any more looks like: nothing listed, fenced or departed.
_UNUSED = (
    "(SELECT count(*) FROM migrator.capture_users) + (SELECT count(*) FROM migrator.fenced_users) "
    "+ (SELECT count(*) FROM migrator.departed) + (SELECT count(*) FROM migrator.fences) = 0"
)


def _retire(ctx: Context, dsn: str, sid: str | None, *, fence_too: bool, wait: bool) -> bool:
    """In one message (one round trip to a store an ocean away), under the capture's lock:
    forget the shard's lists (and fences), then drop the guards, functions and log where
    no shard needs them. `wait=False`: a table locked by someone else leaves the guards in
    place (the shard's lists still go). Whether the guards are gone."""
    g = ctx.spec.entity_graph
    with connect(dsn, autocommit=True) as c:
        forget = ""
        if sid is not None:
            lists = ["capture_users", "changes", *(["fences", "fenced_users"] if fence_too else [])]
            shard = sql.Literal(sid).as_string(c)
            forget = " ".join(f"DELETE FROM migrator.{t} WHERE shard_id = {shard};" for t in lists)
        # a held fence counts even when its users all came back here (a move back): it is
        # the cut-over shard's record that its users left, which recovery reads
        drops = []
        for table in reversed(list(ctx.tables.values())):  # children first, as writers lock them
            target = sql.SQL("{}.{}").format(sql.Identifier(g.schema_), sql.Identifier(table.name)).as_string(c)
            drops.append(f"DROP TRIGGER IF EXISTS migrator_guard ON {target};")
            drops.append(f"DROP FUNCTION IF EXISTS migrator.guard_{table.name}();")
        drops.append(
            "DROP TABLE IF EXISTS migrator.changes, migrator.capture_users, migrator.fenced_users, migrator.fences, "
            f"migrator.departed, migrator.{history.CAPTURE.version_table};"
        )
        drop = " ".join(drops)
        if not wait:
            drop = (
                f"BEGIN {drop} EXCEPTION WHEN lock_not_available OR deadlock_detected THEN "
                "PERFORM set_config('migrator.guards', 'left', true); END;"
            )
        body = (
            "BEGIN IF to_regclass('migrator.capture_users') IS NULL THEN RETURN; END IF; "
            f"{forget} IF {_UNUSED} THEN {drop} END IF; END"
        )
        if "$rm$" in body:
            raise SpecError("a table name of the entity graph holds '$rm$', which the capture's SQL quotes with")
        said = send(
            c,
            "BEGIN; SET LOCAL lock_timeout = '2s'; SELECT pg_advisory_xact_lock(hashtext('migrator:capture')); "
            f"DO $rm${body}$rm$; "
            "SELECT to_regclass('migrator.capture_users') IS NULL, current_setting('migrator.guards', true); COMMIT",
        )
    ((gone, left),) = [s.rows for s in said if s.rows is not None][-1]
    if gone:
        logs_at_head.discard(dsn)
    elif left:
        log.warning("guards left on a destination for now (a table was locked); the cleanup command removes them")
    return bool(gone)


def write_users(conn: Conn, table: str, sid: str, members: Control, not_homed_at: str | None = None) -> None:
    """The shard's users (but those the directory homes at `not_homed_at`) into `table`,
    streamed from the control database."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS rm_members (k text NOT NULL, b int NOT NULL) ON COMMIT DROP")
    members.send_members(sid, conn, "rm_members", not_homed_at)
    # A user is in one live shard; rows left by a shard whose control state is gone are replaced.
    conn.execute(f"DELETE FROM migrator.{table} t USING rm_members m WHERE t.user_key = m.k")
    conn.execute(f"DELETE FROM migrator.{table} WHERE shard_id = %s", (sid,))
    conn.execute(f"INSERT INTO migrator.{table} (user_key, shard_id) SELECT k, %s FROM rm_members", (sid,))
    conn.execute("DROP TABLE rm_members")


RUNNING = (
    "pg_snapshot_xip(pg_current_snapshot()) x WHERE x <> ALL(%s::text[]::xid8[]) AND x::xid NOT IN ("
    # the open directory flips of every shard, where the control database shares the server
    f"SELECT backend_xid FROM pg_stat_activity WHERE application_name = '{FLIP_SESSION}' "
    "AND backend_xid IS NOT NULL)"
)


def wait_for_earlier(dsn: str, deadline: float, what: str, ignore: tuple[int, ...] = ()) -> None:
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


def start_capture(ctx: Context, dsn: str, sid: str, wait_s: float | None = 300.0) -> int:
    """Log the shard's users' changes from now on; returns once no transaction that could
    have written unlogged is still running, so a snapshot taken next misses nothing
    (`wait_s=None`: where nobody writes the users' rows yet, e.g. the destination before
    the directory flips). With `wait_s=None`, also how many of the users `dsn` refuses for
    good (the guard an earlier rollback left there, or the fence an earlier move of theirs
    away from it holds, which `arrive` lifts); else 0."""
    install(ctx, dsn)
    departed = 0
    with connect(dsn) as c:
        write_users(c, "capture_users", sid, ctx.control)  # replaces the shard's earlier list
        if wait_s is None:
            (departed,) = c.execute(
                "SELECT count(*) FROM migrator.capture_users u WHERE u.shard_id = %s AND ("
                "EXISTS (SELECT 1 FROM migrator.departed d WHERE d.user_key = u.user_key) OR "
                "EXISTS (SELECT 1 FROM migrator.fenced_users f WHERE f.user_key = u.user_key AND f.shard_id <> %s))",
                (sid, sid),
            ).fetchone()
    if wait_s is not None:
        wait_for_earlier(dsn, time.monotonic() + wait_s, "the change capture")
    return departed


def stop_capture(ctx: Context, dsn: str, sid: str, *, fence_too: bool, wait: bool = True) -> None:
    """Forget the shard's lists and log on `dsn`, and drop the guards if no shard needs
    them. `wait=False` (cleaning up after a failure): one try at dropping them; a table
    locked by someone else leaves them for the next cutover or the cleanup command, and a
    store that does not answer is logged, not raised (the failure being cleaned up after
    is the one to report)."""
    if wait:
        _retire(ctx, dsn, sid, fence_too=fence_too, wait=True)
        return
    try:
        _retire(ctx, dsn, sid, fence_too=fence_too, wait=False)
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning(
            "shard %s: its lists and guards left on a store for now (%s); the cleanup command removes them",
            sid,
            describe(exc),
        )
