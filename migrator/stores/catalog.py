"""What the databases say about the entity graph's tables, and whether two sides match."""

from __future__ import annotations

from dataclasses import dataclass

from migrator.errors import PrivilegeMissing, SchemaMismatch
from migrator.spec import EntityGraph
from migrator.stores.postgres import Conn


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(), e.g. 'timestamp with time zone', 'numeric(10,2)'
    not_null: bool


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[Column, ...]
    pk: tuple[str, ...]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


# Every column of the named tables, with its place in the table's primary key (NULL when
# not in it): one round trip for the whole graph.
_COLS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
  (SELECT k.ord FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
   WHERE i.indrelid = c.oid AND i.indisprimary AND k.attnum = a.attnum) AS pk_ord
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'p')
ORDER BY c.relname, a.attnum
"""


_INDEXES = """
SELECT array_agg(a.attname ORDER BY k.ord)
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum  -- NULL for an expression
WHERE n.nspname = %s AND c.relname = %s AND i.indisvalid AND i.indpred IS NULL AND k.ord <= i.indnkeyatts
GROUP BY i.indexrelid
"""


def unindexed_owner_keys(conn: Conn, graph: EntityGraph, side: str) -> list[str]:
    """Warnings for the owner-key columns no index leads with. Every batch finds its users'
    rows through these columns (the root's key, each table's foreign key to its parent, and
    the parent's key it references); without an index each batch reads the whole table, so
    a copy's time grows with the square of the data."""
    schema = graph.schema_
    leading: dict[str, list[list[str]]] = {}

    def indexed(table: str, cols: list[str]) -> bool:
        if table not in leading:
            leading[table] = [r[0] for r in conn.execute(_INDEXES, (schema, table)).fetchall()]
        return any(len(ix) >= len(cols) and set(ix[: len(cols)]) == set(cols) for ix in leading[table])

    needs = [(graph.root.table, [graph.root.key])]
    for child in graph.tables:
        needs += [(child.table, list(child.fk.keys())), (child.parent, list(child.fk.values()))]
    out, seen = [], set()
    for table, cols in needs:
        if (table, tuple(cols)) in seen or indexed(table, cols):
            continue
        seen.add((table, tuple(cols)))
        why = (
            "every batch will read the whole table, so the copy's time grows with the square of the data"
            if side.startswith("source")
            else "every batch the copy checks and every row a rollback (or a purge) deletes will scan the table"
        )
        out.append(f"{side}: table {schema}.{table} has no index on ({', '.join(cols)}): {why}; create one first")
    return out


# Foreign keys with their columns in pairs (each query adds its WHERE and GROUP BY).
_FK_PAIRS = """
SELECT n.nspname, c.relname, p.relname, con.conname, array_agg(a.attname ORDER BY k.ord),
  array_agg(af.attname ORDER BY k.ord)
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
JOIN LATERAL unnest(con.conkey, con.confkey) WITH ORDINALITY AS k(a1, a2, ord) ON true
JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.a1
JOIN pg_attribute af ON af.attrelid = con.confrelid AND af.attnum = k.a2
"""
_GROUP = "GROUP BY con.oid, n.nspname, c.relname, p.relname, con.conname ORDER BY 1, 2, 4"

# The foreign keys declared between the named tables.
_FKS = (
    _FK_PAIRS
    + "WHERE con.contype = 'f' AND n.nspname = %s AND c.relname = ANY(%s) AND pn.nspname = %s "
    + "AND p.relname = ANY(%s) "
    + _GROUP
)


# Every foreign key into the graph's tables, from any table of any schema.
_INTO = """
SELECT n.nspname, c.relname, p.relname, con.conname
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.contype = 'f' AND pn.nspname = %s AND p.relname = ANY(%s)
ORDER BY 1, 2, 4
"""


# Every foreign key into the graph's tables that refuses a delete of the rows it points
# at (NO ACTION or RESTRICT).
_BLOCKING = (
    _FK_PAIRS + "WHERE con.contype = 'f' AND con.confdeltype IN ('a', 'r') AND pn.nspname = %s "
    "AND p.relname = ANY(%s) " + _GROUP
)


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key from a table outside the graph into one of its tables."""

    schema: str
    table: str
    parent: str
    name: str
    columns: tuple[str, ...]
    parent_columns: tuple[str, ...]


def blocking_keys(conn: Conn, graph: EntityGraph, parents: list[str]) -> list[ForeignKey]:
    """Foreign keys from tables the graph does not move into `parents` that refuse the
    delete of a row they point at: a delete of those rows fails while such a row exists."""
    moved = {(graph.schema_, n) for n in graph.ordered()}
    return [
        ForeignKey(s, t, p, name, tuple(cols), tuple(pcols))
        for s, t, p, name, cols, pcols in conn.execute(_BLOCKING, (graph.schema_, parents)).fetchall()
        if (s, t) not in moved
    ]


# Columns named as the root's key, of its type, in tables with no foreign key into the graph.
_LOOKALIKES = """
SELECT n.nspname, c.relname
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
  AND format_type(a.atttypid, a.atttypmod) = %s
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'migrator')
  AND NOT EXISTS (SELECT 1 FROM pg_constraint con JOIN pg_class p ON p.oid = con.confrelid
                  JOIN pg_namespace pn ON pn.oid = p.relnamespace
                  WHERE con.contype = 'f' AND con.conrelid = c.oid AND pn.nspname = %s AND p.relname = ANY(%s))
ORDER BY 1, 2
"""


def lookalike_tables(conn: Conn, graph: EntityGraph, key_type: str, side: str) -> list[str]:
    """Tables the spec neither moves nor excludes with a column named as the root's key and
    of its type, but no foreign key into the graph: they may hold users' rows the catalog
    cannot tie to them. A warning each (the database cannot tell; a person can)."""
    names = list(graph.ordered())
    known = {(graph.schema_, n) for n in names} | {
        tuple(x.table.split(".", 1)) if "." in x.table else (graph.schema_, x.table) for x in graph.exclude
    }
    found = conn.execute(_LOOKALIKES, (graph.root.key, key_type, graph.schema_, names)).fetchall()
    return [
        f"{side}: table {s}.{t} has a column {graph.root.key} ({key_type}) like the root's key but no foreign "
        "key into the graph: if it holds users' rows, name it in entity_graph.tables or entity_graph.exclude"
        for s, t in found
        if (s, t) not in known
    ]


def unnamed_tables(conn: Conn, graph: EntityGraph, side: str) -> list[str]:
    """Tables holding rows that point at the graph's (a foreign key into one of its tables)
    which the spec neither moves nor excludes with a reason: their rows would stay behind
    at the old home, silently. One line each, naming the table, its key and the store."""
    names = list(graph.ordered())
    moved = {(graph.schema_, n) for n in names}
    excluded = {tuple(x.table.split(".", 1)) if "." in x.table else (graph.schema_, x.table) for x in graph.exclude}
    out = []
    for schema, table, parent, con in conn.execute(_INTO, (graph.schema_, names)).fetchall():
        if (schema, table) in moved or (schema, table) in excluded:
            continue
        out.append(
            f"{side}: table {schema}.{table} has a foreign key ({con}) to {graph.schema_}.{parent}, but the spec "
            "neither moves it (entity_graph.tables) nor excludes it (entity_graph.exclude, with a reason): "
            "its rows would stay behind"
        )
    return out


def read_tables(conn: Conn, schema: str, names: list[str]) -> dict[str, Table]:
    """The named tables of the schema that exist, in one query."""
    cols: dict[str, list[Column]] = {}
    pks: dict[str, list[tuple[int, str]]] = {}
    for table, name, type_, not_null, pk_ord in conn.execute(_COLS, (schema, names)).fetchall():
        cols.setdefault(table, []).append(Column(name, type_, not_null))
        if pk_ord is not None:
            pks.setdefault(table, []).append((pk_ord, name))
    return {t: Table(schema, t, tuple(c), tuple(name for _, name in sorted(pks.get(t, [])))) for t, c in cols.items()}


def read_table(conn: Conn, schema: str, name: str) -> Table | None:
    return read_tables(conn, schema, [name]).get(name)


def read_graph(conn: Conn, graph: EntityGraph, side: str) -> dict[str, Table]:
    """The graph's tables as this database has them; checks every name the spec uses."""
    out: dict[str, Table] = {}
    names = list(graph.ordered())
    found = read_tables(conn, graph.schema_, names)
    for name in names:
        t = found.get(name)
        if t is None:
            raise SchemaMismatch(f"{side}: table {graph.schema_}.{name} does not exist")
        if not t.pk:
            raise SchemaMismatch(f"{side}: table {name} has no primary key; rows could not be named")
        out[name] = t
    root = graph.root
    named = ((root.key, "key"), (root.residency, "residency"), (root.created_at, "created_at"))
    for col, what in (*named, (root.updated_at, "updated_at")):
        if col is not None and col not in out[root.table].names:
            raise SchemaMismatch(f"{side}: entity_graph.root.{what}: column {root.table}.{col} does not exist")
    fks: dict[tuple[str, str], list[dict[str, str]]] = {}
    for _, table, parent, _, cols, refs in conn.execute(_FKS, (graph.schema_, names, graph.schema_, names)).fetchall():
        fks.setdefault((table, parent), []).append(dict(zip(cols, refs)))
    for child in graph.tables:
        for mine, theirs in child.fk.items():
            if mine not in out[child.table].names:
                raise SchemaMismatch(f"{side}: table {child.table}: fk column {child.table}.{mine} does not exist")
            if theirs not in out[child.parent].names:
                raise SchemaMismatch(f"{side}: table {child.table}: fk column {child.parent}.{theirs} does not exist")
            mt, tt = out[child.table].column(mine).type, out[child.parent].column(theirs).type
            if mt != tt:
                raise SchemaMismatch(
                    f"{side}: table {child.table}: fk {child.table}.{mine} is {mt} but "
                    f"{child.parent}.{theirs} is {tt}; the pairing cannot join"
                )
        if child.fk not in fks.get((child.table, child.parent), []):
            pairs = ", ".join(f"{child.table}.{a} -> {child.parent}.{b}" for a, b in child.fk.items())
            raise SchemaMismatch(
                f"{side}: entity_graph: table {child.table}'s fk ({pairs}) is not a foreign key "
                f"the database declares from {child.table} to {child.parent}"
            )
    return out


def compare(source: dict[str, Table], dest: dict[str, Table], dest_name: str) -> None:
    """Refuse a destination whose tables differ from the source's in columns, types or keys."""
    for name, s in source.items():
        d = dest[name]
        if [(c.name, c.type) for c in s.columns] != [(c.name, c.type) for c in d.columns]:
            sc = {c.name: c.type for c in s.columns}
            dc = {c.name: c.type for c in d.columns}
            for col in sc.keys() | dc.keys():
                if sc.get(col) != dc.get(col):
                    raise SchemaMismatch(
                        f"{dest_name}: table {name} column {col}: source has "
                        f"{sc.get(col, 'no such column')}, destination has {dc.get(col, 'no such column')}"
                    )
            raise SchemaMismatch(f"{dest_name}: table {name}: columns are in a different order than at the source")
        if s.pk != d.pk:
            raise SchemaMismatch(
                f"{dest_name}: table {name}: primary key {list(d.pk)} differs from the source's {list(s.pk)}"
            )


# What each side needs (docs/privileges.md): the source is read and guarded (triggers
# log changes and enforce the fence); a destination is written and, after cutover, guarded
# too; both keep the tool's own tables in a schema `migrator`.
SOURCE_TABLE_PRIVILEGES = ("SELECT", "TRIGGER")
DESTINATION_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRIGGER")


def missing_privileges(
    conn: Conn, graph: EntityGraph | None, table_privileges: tuple[str, ...], side: str
) -> list[str]:
    """What the connected role lacks on this side, each named with its object."""
    out: list[str] = []
    role, have_schema = conn.execute("SELECT current_user, to_regnamespace('migrator') IS NOT NULL").fetchone()
    if have_schema:
        if not conn.execute(
            "SELECT has_schema_privilege('migrator', 'CREATE') AND has_schema_privilege('migrator', 'USAGE')"
        ).fetchone()[0]:
            out.append(f"{side}: role {role} lacks CREATE and USAGE on schema migrator")
    elif not conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()[0]:
        out.append(f"{side}: role {role} lacks CREATE on the database (for the schema migrator)")
    if graph is None:
        return out
    if not conn.execute("SELECT has_schema_privilege(%s, 'USAGE')", (graph.schema_,)).fetchone()[0]:
        return out + [f"{side}: role {role} lacks USAGE on schema {graph.schema_}"]
    for name in graph.ordered():
        qualified = f'"{graph.schema_}"."{name}"'
        for priv in table_privileges:
            if not conn.execute("SELECT has_table_privilege(%s, %s)", (qualified, priv)).fetchone()[0]:
                out.append(f"{side}: role {role} lacks {priv} on table {graph.schema_}.{name}")
    return out


def check_privileges(found: list[str]) -> None:
    if found:
        raise PrivilegeMissing("missing privileges (see docs/privileges.md): " + "; ".join(found))
