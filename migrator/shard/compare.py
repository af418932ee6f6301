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
    ctx: Context, sid: str, *, log_at: str, origin: str, destination: str, after=None, upto=None
) -> list[RowDifference]:
    """Compare, at `origin` (the shard's from-region) and at `destination`, only the rows
    whose keys are in the change log kept at `log_at` (the origin's before a cutover's
    decision, the destination's during a rollback), past log position `after`, up to `upto`. Every other
    row is unchanged since the copy's snapshot and was compared by the full verification,
    so a fence that compares only what changed since the last such comparison stays short
    whatever the size of the shard."""
    g = ctx.spec.entity_graph
    diffs: list[RowDifference] = []
    for name, pks in capture.touched_keys(log_at, sid, after, upto).items():
        table = ctx.tables[name]
        ident = sql.SQL("{}.{}").format(sql.Identifier(g.schema_), sql.Identifier(name))
        pkcols = sql.SQL(", ").join(sql.Identifier(c) for c in table.pk)
        pktext = sql.SQL(", ").join(sql.SQL("t0.{}::text").format(sql.Identifier(c)) for c in table.pk)
        q = sql.SQL(
            "SELECT {}, {} FROM {} t0 JOIN jsonb_populate_recordset(NULL::{}, %(pks)s::jsonb) k USING ({})"
        ).format(pktext, sqlgen.row_hash(table), ident, ident, pkcols)
        sides = []
        for dsn in (origin, destination):
            with connect(dsn, autocommit=True) as c:
                sides.append({tuple(r[:-1]): r[-1] for r in c.execute(q, {"pks": json.dumps(pks)}).fetchall()})
        src, dst = sides
        for pk in sorted(src.keys() | dst.keys()):
            if src.get(pk) != dst.get(pk):
                problem = (
                    "missing at destination"
                    if pk not in dst
                    else "extra at destination"
                    if pk not in src
                    else "different"
                )
                diffs.append(RowDifference.of(name, table.pk, pk, problem))
    return diffs
