"""Pure SQL building: the ownership join of each table, the canonical row digest, and the
statements the copier, verifier and rollback run. Nothing here touches a connection.

Design: the canonical digest
----------------------------
A row's digest must be equal on two servers exactly when the rows are equal, whatever the
session's time zone or the server version. It is PostgreSQL's record hash over the row's
columns, `hash_record_extended(ROW(c1, c2, ...), 0)`, which combines each column's own
64-bit hash (the hashes behind hash partitioning, whose partitions rely on them staying
the same across server upgrades) in column order, without writing the row out as text.
A column goes in as it is only where its type's hash tells apart every two values that
differ: integers, boolean, uuid, bytea, date, timestamp and timestamptz (the instant, so
the session's TimeZone plays no part), inet, and text and varchar under the "C" collation
(their bytes). Every other type goes in as its text, written by its output function
under the session every connection pins (`stores.postgres.PINNED`): numeric keeps its
scale (1.0 is not 1.00), a float its shortest exact text (-0 is not 0), an interval its
fields ('1 day' is not '24 hours'), json and jsonb their canonical jsonb text; and so a
type without a hash of its own (a geometric type, say) can be hashed too. NULL differs from '' and 'NULL'.
The record hash is a sum of the columns' hashes weighted by position, so it is mixed once
more (`hashint8extended`): otherwise two rows that traded values in one column would
leave a set's sum unchanged.

A set of rows aggregates to (count, sum of the row hashes) -- order-free, and unlike XOR
a duplicated row changes it. The hash looks for accidental differences (lost, doubled or
altered rows), not for forgeries. Hashing the columns costs about a third of writing the
row out as text and hashing that. It needs PostgreSQL 14 or later, and both servers of a
comparison must share byte order (as every platform PostgreSQL ships for today does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

from migrator.spec import EntityGraph
from migrator.stores.catalog import Column, Table

# Types whose hash differs for every two values that differ (text types under "C").
EXACT_HASH = {
    "smallint",
    "integer",
    "bigint",
    "boolean",
    "uuid",
    "bytea",
    "date",
    "inet",
    "timestamp without time zone",
    "timestamp with time zone",
    "text",
    "character varying",
}
TEXTUAL = {"text", "character varying"}


def base_type(type_name: str) -> str:
    """format_type() without its modifiers: 'numeric(10,2)' -> 'numeric',
    'timestamp(3) with time zone' -> 'timestamp with time zone'."""
    return re.sub(r"\s+", " ", re.sub(r"\([^)]*\)", "", type_name)).strip()


def canonical(col: Column, alias: str = "t0") -> sql.Composed:
    """A column as it enters the row hash (see the module's design note)."""
    ref = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(col.name))
    t = base_type(col.type)
    if t in TEXTUAL:
        return sql.SQL('({} COLLATE "C")').format(ref)
    if t in EXACT_HASH:
        return ref
    if t == "json":
        return sql.SQL('({}::jsonb::text COLLATE "C")').format(ref)
    return sql.SQL('({}::text COLLATE "C")').format(ref)


def row_hash(table: Table, alias: str = "t0") -> sql.Composed:
    """A bigint hash of the row's columns."""
    fields = sql.SQL(", ").join(canonical(c, alias) for c in table.columns)
    return sql.SQL("hashint8extended(hash_record_extended(ROW({}), 0), 0)").format(fields)


@dataclass(frozen=True)
class Ownership:
    """FROM ... JOIN ... for a table, and the expression of its owner's root key."""

    from_: sql.Composed
    owner: sql.Composed
    joined: int = 0  # how many parent tables are joined


@dataclass(frozen=True)
class Hop:
    """One join along the owner-key path: the parent table, its alias, and the pairs
    (parent column, the child's alias, child column) it is joined on."""

    parent: str
    alias: str
    on: tuple[tuple[str, sql.Composable, str], ...]

    def condition(self) -> sql.Composed:
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} = {}.{}").format(sql.Identifier(self.alias), sql.Identifier(p), child, sql.Identifier(c))
            for p, child, c in self.on
        )

    def join(self, schema: str) -> sql.Composed:
        return sql.SQL("JOIN {}.{} AS {} ON {}").format(
            sql.Identifier(schema), sql.Identifier(self.parent), sql.Identifier(self.alias), self.condition()
        )


def owner_path(
    graph: EntityGraph, table: str, child: sql.Composable, prefix: str
) -> tuple[list[Hop], sql.Composable, str]:
    """The one walk along a table's foreign-key path to the root: the parents to join (aliased
    prefix1, prefix2, ...) from the row `child` (an alias, or a trigger's NEW or OLD), and
    (alias, column) of the owner's key. The root itself is joined only when the last hop
    does not reference its key."""
    root = graph.root
    if table == root.table:
        return [], child, root.key
    hops = graph.path(table)
    out: list[Hop] = []
    alias = child
    for i, hop in enumerate(hops, start=1):
        if i == len(hops) and list(hop.fk.values()) == [root.key]:
            (mine,) = hop.fk.keys()
            return out, alias, mine
        nxt = f"{prefix}{i}"
        out.append(Hop(hop.parent, nxt, tuple((p, alias, c) for c, p in hop.fk.items())))
        alias = sql.Identifier(nxt)
    return out, alias, root.key


def ownership(graph: EntityGraph, table: str) -> Ownership:
    """FROM the table (t0) JOIN its parents along the owner-key path, and the owner's key."""
    schema = graph.schema_
    hops, alias, col = owner_path(graph, table, sql.Identifier("t0"), "t")
    parts = [sql.SQL("{}.{} AS t0").format(sql.Identifier(schema), sql.Identifier(table))]
    parts += [hop.join(schema) for hop in hops]
    owner = sql.SQL("{}.{}").format(alias, sql.Identifier(col))
    return Ownership(sql.SQL(" ").join(parts), owner, len(hops))


def owner_of_record(graph: EntityGraph, table: str, rec: str) -> sql.Composed:
    """The owner's key (as text) of a trigger's row `rec` (NEW or OLD) of `table`."""
    schema = graph.schema_
    hops, alias, col = owner_path(graph, table, sql.SQL(rec), "p")
    key = sql.SQL("{}.{}").format(alias, sql.Identifier(col))
    if not hops:
        return sql.SQL("({})::text").format(key)
    first = hops[0]
    parents = [
        sql.SQL("{}.{} AS {}").format(sql.Identifier(schema), sql.Identifier(first.parent), sql.Identifier(first.alias))
    ]
    parents += [hop.join(schema) for hop in hops[1:]]
    return sql.SQL("(SELECT ({})::text FROM {} WHERE {} LIMIT 1)").format(
        key, sql.SQL(" ").join(parents), first.condition()
    )


def _cols(table: Table, alias: str = "t0") -> sql.Composed:
    return sql.SQL(", ").join(
        sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c.name)) for c in table.columns
    )


def keys_arg(keys: list[str]) -> dict[str, str]:
    """The %(keys)s parameter of the statements below: the users' keys as one text[] literal.

    One string is cheap to send however many keys a batch has (a COPY's parameters are
    bound in the client, where adapting a list of thousands of keys one by one costs more
    than streaming the rows), and the server still sees a constant array it can plan for."""
    return {"keys": "{" + ",".join('"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"' for k in keys) + "}"}


def keys_filter(own: Ownership, key_type: str) -> sql.Composed:
    # Keys travel as text[] and are cast to the root key's type on the server.
    return sql.SQL("{} = ANY(%(keys)s::text[]::{}[])").format(own.owner, sql.SQL(key_type))


def copy_out(graph: EntityGraph, table: Table, key_type: str) -> sql.Composed:
    """COPY of the rows of a set of users (%(keys)s) in binary format."""
    own = ownership(graph, table.name)
    q = sql.SQL("SELECT {} FROM {} WHERE {}").format(_cols(table), own.from_, keys_filter(own, key_type))
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(q)


def copy_in(graph: EntityGraph, table: Table) -> sql.Composed:
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns)
    return sql.SQL("COPY {}.{} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(graph.schema_), sql.Identifier(table.name), cols
    )


STAGE = "pg_temp.migrator_stage"
BATCH_TAG = "$migrator_batch$"


def stage_out(graph: EntityGraph, tables: list[Table], key_type: str) -> sql.Composed:
    """COPY of a set of users' rows of every table as one stream: (the table's position in
    `tables`, the row's columns as text[]), in binary format."""
    parts = [
        sql.SQL("SELECT {}::int, ARRAY[{}]::text[] FROM {} WHERE {}").format(
            sql.Literal(i),
            sql.SQL(", ").join(sql.SQL("t0.{}::text").format(sql.Identifier(c.name)) for c in table.columns),
            own.from_,
            keys_filter(own, key_type),
        )
        for i, table in enumerate(tables)
        for own in [ownership(graph, table.name)]
    ]
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(sql.SQL(" UNION ALL ").join(parts))


def unstage(graph: EntityGraph, tables: list[Table], skips: list[bool | None]) -> sql.Composed:
    """One block inserting each table's staged rows (in order, parents first, triggers
    skipped where `skips` says; None leaves them as they are), each count checked against
    what was staged for it (SQLSTATE RMC01 names the table and the counts), the counts left
    in `migrator.took` as JSON for the ledger's row."""
    stage = sql.SQL(STAGE)
    body = [
        sql.SQL("DECLARE n bigint; sent bigint[]; took jsonb := jsonb_build_object(); BEGIN"),
        sql.SQL(
            "SELECT array_agg(coalesce(s.n, 0) ORDER BY i) INTO sent FROM generate_series(0, {}) i "
            "LEFT JOIN (SELECT tbl, count(*) AS n FROM {} GROUP BY tbl) s ON s.tbl = i;"
        ).format(sql.Literal(len(tables) - 1), stage),
    ]
    for i, (table, skip) in enumerate(zip(tables, skips, strict=True)):
        if skip is not None:
            body.append(
                sql.SQL("PERFORM set_config('session_replication_role', {}, true);").format(
                    sql.Literal("replica" if skip else "origin")
                )
            )
        casts = sql.SQL(", ").join(
            sql.SQL("cols[{}]::{}").format(sql.Literal(k + 1), sql.SQL(c.type)) for k, c in enumerate(table.columns)
        )
        name = sql.Literal(table.name)
        body += [
            sql.SQL("INSERT INTO {}.{} ({}) SELECT {} FROM {} WHERE tbl = {};").format(
                sql.Identifier(graph.schema_),
                sql.Identifier(table.name),
                sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns),
                casts,
                stage,
                sql.Literal(i),
            ),
            sql.SQL("GET DIAGNOSTICS n = ROW_COUNT;"),
            sql.SQL(
                "IF n <> sent[{}] THEN RAISE EXCEPTION USING ERRCODE = 'RMC01', MESSAGE = format("
                "'table %s: the source sent %s rows, the destination took %s', {}, sent[{}], n); END IF;"
            ).format(sql.Literal(i + 1), name, sql.Literal(i + 1)),
            sql.SQL("took := took || jsonb_build_object({}, n);").format(name),
        ]
    body.append(sql.SQL("PERFORM set_config('migrator.took', took::text, true); END"))
    return sql.SQL("DO {} {} {}").format(sql.SQL(BATCH_TAG), sql.SQL(" ").join(body), sql.SQL(BATCH_TAG))


def digest_keys(graph: EntityGraph, table: Table, key_type: str) -> sql.Composed:
    """(count, sum of row hashes) over a set of users' rows."""
    own = ownership(graph, table.name)
    return sql.SQL("SELECT count(*), coalesce(sum({}), 0)::text FROM {} WHERE {}").format(
        row_hash(table), own.from_, keys_filter(own, key_type)
    )


HASH_ENTRY_BYTES = 96  # a hash-join entry (a key and its batch, or a parent key and its batch) with its bucket
MIN_HASH_MB = 128
# work_mem starts at the floor, not the server's default (4 MB), so a caller that does not
# size it with `set_hash_mb` still gets hashes of a useful size.
ONE_PASS = {"enable_nestloop": "off", "hash_mem_multiplier": "1", "work_mem": f"{MIN_HASH_MB}MB"}


def one_pass_settings(conn) -> None:
    """For the current transaction: the one-pass aggregates over a whole shard join every
    row of a table with the shard's key table, which a hash join does in one pass at any
    size; a nested loop misjudged from an estimate would take quadratic time. Ruled out here."""
    for k, v in ONE_PASS.items():
        conn.execute("SELECT set_config(%s, %s, true)", (k, v))


def hash_mb(build_rows: int, max_mb: int) -> int:
    """Memory for one hash join whose smaller side has about `build_rows` rows: enough to
    hold it at once, so the join is one pass (a hash table split into batches on disk costs
    a second pass over both sides), but never above max_mb."""
    need = -(-build_rows * HASH_ENTRY_BYTES // 2**20)
    return max(MIN_HASH_MB, min(max_mb, need + need // 4))


def set_hash_mb(conn, mb: int) -> None:
    """For the current transaction (with `one_pass_settings`, whose multiplier makes work_mem the hash's)."""
    conn.execute("SELECT set_config('work_mem', %s, true)", (f"{mb}MB",))


def digest_by_batch(graph: EntityGraph, table: Table, keys_table: str) -> sql.Composed:
    """One pass over a table: (batch, count, sum) for the users listed in a keys table."""
    own = ownership(graph, table.name)
    return sql.SQL(
        "SELECT m.b, count(*), coalesce(sum({}), 0)::text FROM {} JOIN {} AS m ON m.k = {} GROUP BY m.b"
    ).format(row_hash(table), own.from_, sql.Identifier(keys_table), own.owner)


def pk_hashes(graph: EntityGraph, table: Table, key_type: str) -> sql.Composed:
    """Each row's primary key (as text) and hash, for naming the rows that differ."""
    own = ownership(graph, table.name)
    pk = sql.SQL(", ").join(sql.SQL("t0.{}::text").format(sql.Identifier(c)) for c in table.pk)
    order = sql.SQL(", ").join(sql.SQL("t0.{}").format(sql.Identifier(c)) for c in table.pk)
    return sql.SQL("SELECT {}, {} FROM {} WHERE {} ORDER BY {}").format(
        pk, row_hash(table), own.from_, keys_filter(own, key_type), order
    )


def existing_pks(graph: EntityGraph, table: Table, key_type: str, limit: int = 5) -> sql.Composed:
    own = ownership(graph, table.name)
    pk = sql.SQL(", ").join(sql.SQL("t0.{}::text").format(sql.Identifier(c)) for c in table.pk)
    return sql.SQL("SELECT {} FROM {} WHERE {} LIMIT {}").format(
        pk, own.from_, keys_filter(own, key_type), sql.Literal(limit)
    )


def any_rows(graph: EntityGraph, tables: list[Table]) -> sql.Composed:
    """Whether each table has a row, as one boolean[] (probes that stop at the first live row)."""
    return sql.SQL("SELECT ARRAY[{}]").format(
        sql.SQL(", ").join(
            sql.SQL("EXISTS (SELECT FROM {}.{})").format(sql.Identifier(graph.schema_), sql.Identifier(t.name))
            for t in tables
        )
    )


def count_by_group(graph: EntityGraph, table: Table, keys_table: str) -> sql.Composed:
    """One pass over a table: (group, rows, bytes) for the users listed in a keys table; the
    bytes are the rows' stored size (`pg_column_size` of each row), so no statistics are needed."""
    own = ownership(graph, table.name)
    return sql.SQL(
        "SELECT m.b, count(*), coalesce(sum(pg_column_size(t0.*)), 0) FROM {} JOIN {} AS m ON m.k = {} GROUP BY m.b"
    ).format(own.from_, sql.Identifier(keys_table), own.owner)


def owned(graph: EntityGraph, table: Table, key_type: str) -> tuple[sql.Identifier, sql.Composed]:
    """The alias and condition for a statement on `table` itself (DELETE, UPDATE) that
    picks the rows of a set of users (%(keys)s)."""
    own = ownership(graph, table.name)
    if own.joined == 0:  # the owner column is on the table itself
        return sql.Identifier("t0"), keys_filter(own, key_type)
    if len(table.pk) == 1:
        # The batch's primary keys first (an init plan through the owner-key joins), then
        # each row by its key: a semi-join of the table with itself would read all of it.
        return sql.Identifier("d"), sql.SQL("d.{} = ANY(ARRAY(SELECT t0.{} FROM {} WHERE {}))").format(
            sql.Identifier(table.pk[0]), sql.Identifier(table.pk[0]), own.from_, keys_filter(own, key_type)
        )
    pk_match = sql.SQL(" AND ").join(sql.SQL("d.{0} = t0.{0}").format(sql.Identifier(c)) for c in table.pk)
    return sql.Identifier("d"), sql.SQL("EXISTS (SELECT 1 FROM {} WHERE {} AND {})").format(
        own.from_, pk_match, keys_filter(own, key_type)
    )


def delete_keys(graph: EntityGraph, table: Table, key_type: str) -> sql.Composed:
    """Delete a set of users' rows of one table (children must go first)."""
    alias, cond = owned(graph, table, key_type)
    return sql.SQL("DELETE FROM {}.{} AS {} WHERE {}").format(
        sql.Identifier(graph.schema_), sql.Identifier(table.name), alias, cond
    )


def distinct_values(graph: EntityGraph, table: Table, column: str, key_type: str) -> sql.Composed:
    """The distinct non-null values, as text, of one column over a set of users' rows."""
    alias, cond = owned(graph, table, key_type)
    return sql.SQL("SELECT DISTINCT {0}.{1}::text FROM {2}.{3} AS {0} WHERE {4} AND {0}.{1} IS NOT NULL").format(
        alias, sql.Identifier(column), sql.Identifier(graph.schema_), sql.Identifier(table.name), cond
    )


def replace_values(graph: EntityGraph, table: Table, stages: dict[str, str], key_type: str) -> sql.Composed:
    """Set each column of `stages` in a set of users' rows to what its stage table (v: the
    value as text, p: its replacement) maps the value to; NULL stays NULL."""
    alias, cond = owned(graph, table, key_type)
    sets = [
        sql.SQL("{0} = (SELECT z.p FROM {1} AS z WHERE z.v = {2}.{0}::text)").format(
            sql.Identifier(col), sql.Identifier(stage), alias
        )
        for col, stage in stages.items()
    ]
    return sql.SQL("UPDATE {}.{} AS {} SET {} WHERE {}").format(
        sql.Identifier(graph.schema_), sql.Identifier(table.name), alias, sql.SQL(", ").join(sets), cond
    )
