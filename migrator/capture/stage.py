"""The stage at the destination that a catch-up pass fills with what the source has now of
the keys changed past its position, and the statements that apply it there: each table's
rows upserted, parents first, then each table's changed keys the source has no more
deleted, children first. Rows travel as (the pass, the table's position, its columns as
text[]), each column cast back by its type's input (as a copied batch's stream,
`phases.copy_stream`), so every table's changes go in one stream or one message."""

from __future__ import annotations

from psycopg import sql

from migrator.spec import EntityGraph
from migrator.stores.catalog import Table

CHANGED = "pg_temp.migrator_changed"
CREATE = f"CREATE TEMP TABLE IF NOT EXISTS {CHANGED} (pass bigint NOT NULL, tbl int NOT NULL, cols text[] NOT NULL)"


def rows(graph: EntityGraph, tables: list[Table], pass_no: int) -> sql.Composed:
    """The rows the source has now of each table's changed keys (%(k<position>)s: JSON), as
    (the pass, the table's position, its columns as text[])."""
    parts = []
    for i, t in enumerate(tables):
        ident = sql.SQL("{}.{}").format(sql.Identifier(graph.schema_), sql.Identifier(t.name))
        parts.append(
            sql.SQL(
                "SELECT {}::bigint, {}::int, ARRAY[{}]::text[] FROM {} t0 "
                "JOIN jsonb_populate_recordset(NULL::{}, %(k{})s::jsonb) k USING ({})"
            ).format(
                sql.Literal(pass_no),
                sql.Literal(i),
                sql.SQL(", ").join(sql.SQL("t0.{}::text").format(sql.Identifier(c.name)) for c in t.columns),
                ident,
                ident,
                sql.SQL(str(i)),
                sql.SQL(", ").join(sql.Identifier(c) for c in t.pk),
            )
        )
    return sql.SQL(" UNION ALL ").join(parts)


def apply(graph: EntityGraph, tables: list[Table], keys: dict[str, str], pass_no: int) -> sql.Composed:
    """The statements applying a pass's stage: each table's rows upserted, parents first,
    then each table's changed keys the source has no more deleted, children first."""
    stmts = []
    staged = sql.SQL("FROM {} s WHERE s.pass = {} AND s.tbl = {}")
    for i, t in enumerate(tables):
        ident = sql.SQL("{}.{}").format(sql.Identifier(graph.schema_), sql.Identifier(t.name))
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in t.columns)
        casts = sql.SQL(", ").join(
            sql.SQL("s.cols[{}]::{}").format(sql.Literal(k + 1), sql.SQL(c.type)) for k, c in enumerate(t.columns)
        )
        others = [c.name for c in t.columns if c.name not in t.pk]
        action = (
            sql.SQL("DO NOTHING")
            if not others
            else sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in others)
            )
        )
        stmts.append(
            sql.SQL("INSERT INTO {} ({}) SELECT {} {} ON CONFLICT ({}) {}").format(
                ident,
                cols,
                casts,
                staged.format(sql.SQL(CHANGED), sql.Literal(pass_no), sql.Literal(i)),
                sql.SQL(", ").join(sql.Identifier(c) for c in t.pk),
                action,
            )
        )
    for i, t in reversed(list(enumerate(tables))):
        ident = sql.SQL("{}.{}").format(sql.Identifier(graph.schema_), sql.Identifier(t.name))
        position = {c.name: k + 1 for k, c in enumerate(t.columns)}
        match = sql.SQL(" AND ").join(sql.SQL("d.{0} = k.{0}").format(sql.Identifier(c)) for c in t.pk)
        still = sql.SQL(" AND ").join(
            sql.SQL("s.cols[{}]::{} = k.{}").format(
                sql.Literal(position[c]), sql.SQL(t.columns[position[c] - 1].type), sql.Identifier(c)
            )
            for c in t.pk
        )
        stmts.append(
            sql.SQL(
                "DELETE FROM {} d USING jsonb_populate_recordset(NULL::{}, {}::jsonb) k WHERE {} "
                "AND NOT EXISTS (SELECT 1 {} AND {})"
            ).format(
                ident,
                ident,
                sql.Literal(keys[t.name]),
                match,
                staged.format(sql.SQL(CHANGED), sql.Literal(pass_no), sql.Literal(i)),
                still,
            )
        )
    return sql.SQL("; ").join(stmts)
