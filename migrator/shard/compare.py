"""The comparison of a shard's changed rows on two sides, which the cutover (inside its
fence) and the rollback (before it hands users back) both run.

It guarantees that every row whose key the change log holds (past a position, up to
another) is equal on both sides when read; every other row is unchanged since the copy's
snapshot and was compared by the full verification, so the comparison stays short
whatever the size of the shard.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from psycopg import sql

from migrator import capture
from migrator.control.context import Context
from migrator.differences import Difference, RowDifference
from migrator.stores import sqlgen
from migrator.stores.postgres import connect


def not_changed_since(differences: Sequence[Difference], changed: set[tuple[str, tuple]]) -> list[Difference]:
    """The differences but those on rows in `changed` (from `capture.touched`): rows still
    changing, compared later."""
    return [
        d
        for d in differences
        if not isinstance(d, RowDifference) or (d.table, tuple(sorted(dict(d.pk).items()))) not in changed
    ]


def compare_touched(
    ctx: Context,
    sid: str,
    *,
    log_at: str,
    origin: str,
    destination: str,
    after=None,
    upto=None,
) -> list[RowDifference]:
    """Compare, at `origin` (the shard's from-region) and at `destination`, only the rows
    whose keys are in the change log kept at `log_at` (the origin's before a cutover's
    decision, the destination's during a rollback), past log position `after`, up to `upto`. Every other
    row is unchanged since the copy's snapshot and was compared by the full verification,
    so a fence that compares only what changed since the last such comparison stays short
    whatever the size of the shard. Each side is read in one statement, every table at once."""
    touched = capture.touched_keys(log_at, sid, after, upto)
    if not touched:
        return []
    names, q, params = touched_query(ctx, touched)
    sides = []
    for dsn in (origin, destination):
        with connect(dsn, autocommit=True) as c:
            sides.append(c.execute(q, params).fetchall())
    return differences(ctx, names, *sides)


def touched_query(ctx: Context, touched: dict[str, list[dict]]) -> tuple[list[str], sql.Composed, dict[str, str]]:
    """The tables, and one statement (with its parameters) reading (the table's position,
    its primary key as text[], the row's hash) of every row of `touched` (table -> keys)."""
    g = ctx.spec.entity_graph
    names = list(touched)
    parts = []
    for i, name in enumerate(names):
        table = ctx.tables[name]
        ident = sql.SQL("{}.{}").format(sql.Identifier(g.schema_), sql.Identifier(name))
        parts.append(
            sql.SQL(
                "SELECT {}::int, ARRAY[{}]::text[], {} FROM {} t0 "
                "JOIN jsonb_populate_recordset(NULL::{}, %(k{})s::jsonb) k USING ({})"
            ).format(
                sql.Literal(i),
                sql.SQL(", ").join(sql.SQL("t0.{}::text").format(sql.Identifier(c)) for c in table.pk),
                sqlgen.row_hash(table),
                ident,
                ident,
                sql.SQL(str(i)),
                sql.SQL(", ").join(sql.Identifier(c) for c in table.pk),
            )
        )
    params = {f"k{i}": json.dumps(touched[name]) for i, name in enumerate(names)}
    return names, sql.SQL(" UNION ALL ").join(parts), params


def differences(
    ctx: Context, names: list[str], origin: Sequence[tuple], destination: Sequence[tuple]
) -> list[RowDifference]:
    """The rows `touched_query` read that differ between the two sides, by table and key."""
    src = {(r[0], tuple(r[1])): r[2] for r in origin}
    dst = {(r[0], tuple(r[1])): r[2] for r in destination}
    diffs: list[RowDifference] = []
    for key in sorted(src.keys() | dst.keys()):
        if src.get(key) != dst.get(key):
            problem = (
                "missing at destination"
                if key not in dst
                else "extra at destination"
                if key not in src
                else "different"
            )
            diffs.append(RowDifference.of(names[key[0]], ctx.tables[names[key[0]]].pk, key[1], problem))
    return diffs
