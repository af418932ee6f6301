"""Which of the graph's tables a batch may write as logical replication does, skipping
their per-row triggers (`session_replication_role = replica`), and the switch itself.

Design
------
Most of what a batch's COPY or DELETE costs at a database is not the rows but the
per-row foreign-key triggers: each row a copy inserts looks its parent up and locks it,
each row a rollback deletes looks for children (measured at scale 0.3: a plain COPY of
the EU users' rows halves, their DELETE takes a thirteenth of the time without them).
For the graph's own foreign keys (each table's `fk` to its parent, on the owner-key
path) those checks cannot fail for the tool's batches:

* a batch is read in one source snapshot, from a source that declares the same foreign
  keys (`catalog.read_graph` refuses one that does not), through the owner-key path, so
  every parent of a copied row is owned by the same user and copied in the same batch,
  in the same destination transaction, parents first;
* a batch's rows are deleted children first, and every child that references a deleted
  row through a graph edge is owned by the same user, so it is in the same batch and
  already gone; no new one appears meanwhile, since the application writes those users
  nowhere but their home, and the tool deletes them where they are not homed (a rollback
  before cutover) or fenced (a rollback after cutover, a purge: the guards refuse them).

So a table is written with its triggers skipped only when every trigger that would be
skipped is one of those checks or the migrator's own guard (which lets the tool's
sessions past anyway): a user's trigger, a foreign key off the graph's edges, a rule or
a trigger that fires only for replicas keeps the table on per-row triggers, exactly as
before. The role must be a superuser or hold SET on the parameter (PostgreSQL 15+:
`GRANT SET ON PARAMETER session_replication_role TO ...`); without it every table is
written with its triggers, as before. Either way the rows written are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from psycopg import sql

from migrator.spec import EntityGraph
from migrator.stores.postgres import Conn, connect

log = logging.getLogger("migrator.stores.replica")

GUARD = "migrator_guard"

# Every enabled trigger of the named tables, with the foreign key it checks (if any).
_TRIGGERS = """
SELECT c.relname, t.tgname, t.tgenabled::text, con.contype::text,
       cc.relname, cn.nspname, pc.relname, pn.nspname,
       (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(con.conkey) WITH ORDINALITY AS k(n, ord)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n),
       (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(con.confkey) WITH ORDINALITY AS k(n, ord)
          JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n)
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_constraint con ON con.oid = t.tgconstraint
LEFT JOIN pg_class cc ON cc.oid = con.conrelid LEFT JOIN pg_namespace cn ON cn.oid = cc.relnamespace
LEFT JOIN pg_class pc ON pc.oid = con.confrelid LEFT JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE n.nspname = %s AND c.relname = ANY(%s) AND t.tgenabled <> 'D'
"""

# The named tables a replica session could write differently for more than their own
# triggers: one with an enabled rule (a rule, too, may be skipped), or one that is not a
# plain table (a partitioned table's rows land in partitions whose triggers are not read).
_OTHER = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = ANY(%s)
  AND (c.relkind <> 'r'
       OR EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = c.oid AND r.ev_enabled <> 'D'))
"""


@dataclass(frozen=True)
class Trigger:
    """One enabled trigger of a graph table, as the catalog has it."""

    table: str
    name: str
    enabled: str  # pg_trigger.tgenabled: 'O' origin and local, 'A' always, 'R' replica only
    fk: tuple[str, str, tuple[str, ...], str, str, tuple[str, ...]] | None = None
    # (child schema, child table, child columns, parent schema, parent table, parent columns)


def edges(graph: EntityGraph) -> set[tuple[str, str, tuple[str, ...], str, str, tuple[str, ...]]]:
    """The graph's own foreign keys, in the form of `Trigger.fk`."""
    s = graph.schema_
    return {(s, t.table, tuple(t.fk.keys()), s, t.parent, tuple(t.fk.values())) for t in graph.tables}


def skippable(triggers: Iterable[Trigger], graph: EntityGraph, tables: Iterable[str]) -> frozenset[str]:
    """The tables whose every trigger a replica session would skip is a check of a graph
    edge or the migrator's guard, and that have no trigger a replica session would newly
    fire (pure: the rule of the module's design note)."""
    ok = set(tables)
    own = edges(graph)
    for t in triggers:
        if t.enabled == "A":  # fires either way
            continue
        if t.enabled == "O" and (t.name == GUARD or (t.fk is not None and t.fk in own)):
            continue
        ok.discard(t.table)
    return frozenset(ok)


@dataclass(frozen=True)
class Replica:
    """What one database lets a batch skip: the tables, and whether the role may at all."""

    tables: frozenset[str]
    allowed: bool

    def skips(self, table: str) -> bool:
        return self.allowed and table in self.tables

    def skipped(self) -> list[str]:
        """The tables whose graph-edge checks a batch skips here (for the audit)."""
        return sorted(self.tables) if self.allowed else []


NONE = Replica(frozenset(), False)


def _allowed(conn: Conn) -> bool:
    if conn.execute("SELECT current_setting('is_superuser') = 'on'").fetchone()[0]:
        return True
    if not conn.execute("SELECT to_regprocedure('pg_catalog.has_parameter_privilege(text, text)')").fetchone()[0]:
        return False  # before PostgreSQL 15 only a superuser may
    return bool(conn.execute("SELECT has_parameter_privilege('session_replication_role', 'SET')").fetchone()[0])


def read(conn: Conn, graph: EntityGraph, side: str) -> Replica:
    """The tables of the graph this database lets a batch write with triggers skipped."""
    names = graph.ordered()
    if not _allowed(conn):
        log.info("%s: per-row triggers for every table (the role may not set session_replication_role)", side)
        return NONE
    found = [
        Trigger(table, name, enabled, (cn, cc, tuple(ck), pn, pc, tuple(pk)) if contype == "f" else None)
        for table, name, enabled, contype, cc, cn, pc, pn, ck, pk in conn.execute(
            _TRIGGERS, (graph.schema_, names)
        ).fetchall()
    ]
    other = {r[0] for r in conn.execute(_OTHER, (graph.schema_, names)).fetchall()}
    tables = skippable(found, graph, [n for n in names if n not in other])
    kept = [n for n in names if n not in tables]
    if kept:
        log.info("%s: per-row triggers kept for %s (a trigger, rule or partition of their own)", side, ", ".join(kept))
    return Replica(tables, True)


# The triggers of `child` a replica session would skip or newly fire, but its foreign key to `parent`.
_BUT_KEY = """
SELECT count(*) FROM pg_trigger t LEFT JOIN pg_constraint con ON con.oid = t.tgconstraint
WHERE t.tgrelid = %(child)s::regclass
  AND (t.tgenabled = 'R' OR (t.tgenabled = 'O' AND NOT (con.contype = 'f'
       AND con.conrelid = %(child)s::regclass AND con.confrelid = %(parent)s::regclass)))
"""


def only_key_to(conn: Conn, child: str, parent: str) -> bool:
    """Whether a statement on the table `child` may skip its triggers because all it would
    skip are the checks of its foreign key to `parent` (for the tool's own tables, whose
    rows name parents the same transaction wrote), and the role may skip them."""
    return _allowed(conn) and conn.execute(_BUT_KEY, {"child": child, "parent": parent}).fetchone()[0] == 0


def skipping(conn: Conn, on: bool) -> None:
    """The current transaction's next statements with their triggers skipped (or no longer)."""
    conn.execute(skipping_sql(on))


def skipping_sql(on: bool) -> sql.Composed:
    """`skipping` as a statement, for a message of several."""
    return sql.SQL("SELECT set_config('session_replication_role', {}, true)").format(
        sql.Literal("replica" if on else "origin")
    )


def of(dsn: str, graph: EntityGraph, side: str, wanted: bool = True) -> Replica:
    """`read` on a connection of its own; NONE without asking when not `wanted`."""
    if not wanted:
        return NONE
    with connect(dsn, autocommit=True) as c:
        return read(c, graph, side)


def skips_table(replica: Replica, table: str) -> bool | None:
    """Whether `table`'s triggers are skipped for a batch's rows; None where `replica` may not
    set it (they fire as usual)."""
    return replica.skips(table) if replica.allowed else None


def set_for(conn: Conn, replica: Replica, table: str) -> None:
    """For the current transaction's next statements (those on `table`): its triggers
    skipped where `replica` allows, else fired as usual."""
    if replica.allowed:
        skipping(conn, replica.skips(table))
