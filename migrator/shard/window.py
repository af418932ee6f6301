"""The fence window's catch-up and compare: one message to the destination a pass.

Inside the window the shard's users cannot write, and across an ocean every round trip
to the destination is 80 ms of it. A pass outside the window (`log.apply`) streams what
changed into the destination's stage with a COPY (the server answers its start and its
end) and applies it in a third round trip; a compare then reads the changed rows at both
sides. Here a pass reads at the source, beside the worker and in one snapshot: the
changes past the position (below the horizon, as `log.apply`), the rows the source has
now of their keys, and the hashes of every row changed since the last compare before the
window; then it sends the destination one message, on a connection opened before the
window (`log.far_session`), that stages those rows as literals, applies them, commits,
and reads the same rows' hashes back. One round trip a pass; the window takes one pass
unless a transaction that began before the fence commits inside it.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import psycopg
from psycopg import sql

from migrator.capture import log, stage
from migrator.capture.triggers import APPLY
from migrator.control.context import Context
from migrator.differences import RowDifference
from migrator.shard import compare
from migrator.stores.postgres import Conn, connect, send

LIMIT = 50_000  # changes a pass takes at most (as `log.apply`)


def settle(
    ctx: Context,
    sid: str,
    src_dsn: str,
    dst_dsn: str,
    far: Conn | None,
    *,
    settled: log.Position,
    deadline: float,
    ignore: tuple[int, ...] = (),
) -> tuple[int, list[RowDifference]]:
    """Inside the fence window: apply at the destination (on `far`; without one, on a
    connection opened when a pass first needs it) what the source's log holds for the
    shard, until nothing is pending, and compare every row changed past `settled`.
    Returns (changes applied, the rows that differ)."""
    ctl = ctx.control
    pos = ctl.position(sid, "forward")
    applied = 0
    with nullcontext(far) if far is not None else _Lazy(dst_dsn, deadline) as link:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("catch-up did not finish inside the fence window")
            ms = max(1, int((deadline - time.monotonic()) * 1000))
            pos, n, diffs = _pass(ctx, sid, src_dsn, link, pos, settled, ms, ignore)
            ctl.set_position(sid, "forward", pos)
            applied += n
            if diffs is None:  # what is pending waits for an older transaction to end
                time.sleep(0.005)
            elif log.lag(src_dsn, sid, pos) == 0:
                return applied, diffs


class _Lazy:
    """A far session opened at its first use, closed at the end of the block."""

    def __init__(self, dsn: str, deadline: float):
        self.dsn, self.deadline = dsn, deadline
        self.conn: Conn | None = None

    def __enter__(self) -> _Lazy:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def get(self) -> Conn:
        if self.conn is None:
            self.conn = log.far_session(self.dsn, max(0.001, self.deadline - time.monotonic()))
        return self.conn


def _pass(
    ctx: Context,
    sid: str,
    src_dsn: str,
    link: Conn | _Lazy,
    after: log.Position,
    settled: log.Position,
    timeout_ms: int,
    ignore: tuple[int, ...],
) -> tuple[log.Position, int, list[RowDifference] | None]:
    """One pass: (the new position, changes applied, the rows that differ; None where every
    pending change is of a transaction still open, and nothing was sent)."""
    graph = ctx.spec.entity_graph
    with connect(src_dsn) as src:
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        src.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
        pos, n, keys = log.pending(ctx, src, sid, after, LIMIT, ignore)
        if not n and log.lag_on(src, sid, after):
            return pos, 0, None  # nothing below the horizon yet: no trip to the destination
        touched = log.touched_keys_on(src, sid, settled)
        if not touched:
            return pos, n, []
        message: list[sql.Composable] = []
        if keys:
            tables = [ctx.tables[t] for t in keys]
            params = {f"k{i}": keys[t.name] for i, t in enumerate(tables)}
            rows = src.execute(stage.rows(graph, tables, 0), params).fetchall()
            message += [
                sql.SQL("BEGIN"),
                sql.SQL(APPLY),
                sql.SQL(f"SET LOCAL statement_timeout = {timeout_ms}"),
            ]
            if rows:
                message.append(
                    sql.SQL("INSERT INTO {} (pass, tbl, cols) VALUES {}").format(
                        sql.SQL(stage.CHANGED),
                        sql.SQL(", ").join(sql.SQL("({}, {}, {}::text[])").format(*map(sql.Literal, r)) for r in rows),
                    )
                )
            message += [
                stage.apply(graph, tables, keys, 0),
                sql.SQL("DELETE FROM {}").format(sql.SQL(stage.CHANGED)),
                sql.SQL("COMMIT"),
            ]
        names, q, qparams = compare.touched_query(ctx, touched)
        origin = src.execute(q, qparams).fetchall()
        src.rollback()
    far = link if isinstance(link, psycopg.Connection) else link.get()
    message.append(sql.SQL(psycopg.ClientCursor(far).mogrify(q, qparams)))
    destination = _send(far, sql.SQL("; ").join(message).as_string(far))
    return pos, n, compare.differences(ctx, names, origin, destination)


def _send(far: Conn, message: str) -> list[tuple]:
    """Run the message; the rows of its last statement that returns rows."""
    return next((said.rows for said in reversed(send(far, message)) if said.rows is not None), [])
