"""The change log: lag, catch-up passes in transaction order below the horizon, and the
keys touched since a position."""

from __future__ import annotations

import json
import logging
import secrets
import time

import psycopg
from psycopg import sql

from migrator.capture import stage
from migrator.capture.triggers import APPLY, RUNNING, logs_at_head, stop_capture, uninstall_if_unused
from migrator.control.context import Context
from migrator.errors import CatchUpBlocked
from migrator.schema import history
from migrator.stores.postgres import Conn, connect, relay, send

log = logging.getLogger("migrator.capture")


Position = tuple[int, int]  # (horizon, last id): see `apply`
AFTER = "(xid, id) > (%s::text::xid8, %s)"


def lag(dsn: str, sid: str, pos: Position) -> int:
    """Changes logged for the shard past `pos` (committed ones; a running writer's are not
    seen yet). A log from an earlier version is brought up to date first."""
    if dsn not in logs_at_head:
        with connect(dsn, autocommit=True) as c:
            if c.execute("SELECT to_regclass('migrator.changes')").fetchone()[0] is None:
                return 0
        history.ensure(dsn, history.CAPTURE)
    with connect(dsn) as c:
        if c.execute("SELECT to_regclass('migrator.changes')").fetchone()[0] is None:
            return 0
        n = lag_on(c, sid, pos)
    logs_at_head.add(dsn)
    return n


def lag_on(c: Conn, sid: str, pos: Position) -> int:
    """`lag`, read on `c` (at a server whose log is installed)."""
    return c.execute(f"SELECT count(*) FROM migrator.changes WHERE shard_id = %s AND {AFTER}", (sid, *pos)).fetchone()[
        0
    ]


def written(dsn: str, sid: str) -> bool:
    """Whether the application changed any of the shard's rows since its capture began (the
    log at `dsn` holds a change of the shard)."""
    with connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT EXISTS (SELECT FROM migrator.changes WHERE shard_id = %s)", (sid,)).fetchone()
    return bool(row and row[0])


def far_session(dsn: str, bound_s: float) -> Conn:
    """A connection to the side a catch-up writes, opened (and its stage made) before a fence
    window, so that no pass inside the window pays for a connection across the link; each of
    its statements ends within `bound_s`."""
    c = connect(dsn, autocommit=True)
    try:
        c.execute(f"{stage.CREATE}; SET statement_timeout = {max(1, int(bound_s * 1000))}")
    except BaseException:
        c.close()
        raise
    return c


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
    migrator's own, which log nothing) do not hold the horizon back.

    What the source has now of every changed key travels in one COPY into a stage at the
    destination, and one message applies it (parents first: upserted; children first:
    deleted where the source has them no more) and commits: three round trips to the
    destination a pass, whatever the tables (as a copied batch's stream, `phases.copy_stream`)."""
    with connect(src_dsn) as src:
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        if timeout_ms is not None:
            src.execute(f"SET LOCAL statement_timeout = {max(1, timeout_ms)}")
        if lock_wait_ms is not None:
            src.execute(f"SET LOCAL lock_timeout = {max(1, lock_wait_ms)}")
        pos, n, keys = pending(ctx, src, sid, after, limit, ignore)
        if not n:
            return pos, 0
        with connect(dst_dsn, autocommit=True) as dst:
            dst.execute(stage.CREATE)
            _write(ctx, src, dst, keys, timeout_ms, lock_wait_ms)
        src.rollback()
    return pos, n


def pending(
    ctx: Context, src: Conn, sid: str, after: Position, limit: int, ignore: tuple[int, ...]
) -> tuple[Position, int, dict[str, str]]:
    """On `src` (a REPEATABLE READ transaction at the log's server): the changes a pass past
    `after` takes (see `apply`): the new position, how many, and their keys per table as
    JSON, tables in the graph's order, each key once however often it changed."""
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
    distinct: dict[str, dict[str, dict]] = {}
    for _, tbl, pk, _ in rows:
        distinct.setdefault(tbl, {})[json.dumps(pk, sort_keys=True)] = pk
    return pos, len(rows), {t: json.dumps(list(distinct[t].values())) for t in ctx.tables if t in distinct}


def _write(
    ctx: Context, src: Conn, dst: Conn, keys: dict[str, str], timeout_ms: int | None, lock_wait_ms: int | None
) -> None:
    """Stream the source's rows of the changed keys (`keys`: per table, in the graph's order,
    its keys as JSON) into the destination's stage and apply them there in one transaction."""
    tables = [ctx.tables[t] for t in keys]
    pass_no = secrets.randbits(62)  # a failed pass's staged rows are never applied by a later one
    params = {f"k{i}": keys[t.name] for i, t in enumerate(tables)}
    out_sql = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(stage.rows(ctx.spec.entity_graph, tables, pass_no))
    with (
        src.cursor().copy(out_sql, params) as out,
        dst.cursor().copy(f"COPY {stage.CHANGED} (pass, tbl, cols) FROM STDIN (FORMAT BINARY)") as inp,
    ):
        relay(out, inp)
    settings = [APPLY]
    if timeout_ms is not None:
        settings.append(f"SET LOCAL statement_timeout = {max(1, timeout_ms)}")
    if lock_wait_ms is not None:
        settings.append(f"SET LOCAL lock_timeout = {max(1, lock_wait_ms)}")
    message = sql.SQL("BEGIN; {}; {}; DELETE FROM {}; COMMIT").format(
        sql.SQL("; ").join(map(sql.SQL, settings)),
        stage.apply(ctx.spec.entity_graph, tables, keys, pass_no),
        sql.SQL(stage.CHANGED),
    )
    send(dst, message.as_string(dst))


def catch_up(
    ctx: Context,
    sid: str,
    src_dsn: str,
    dst_dsn: str,
    direction: str,
    *,
    pending_at_most: int = 0,
    deadline: float | None = None,
    ignore: tuple[int, ...] = (),
) -> int:
    """Apply passes until at most `pending_at_most` changes are pending; returns changes applied.
    (With 0 outside a fence, a writer that never pauses would keep it going.)

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
        if lag(src_dsn, sid, pos) <= pending_at_most:
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
    with connect(dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass('migrator.changes')").fetchone()[0] is None:
            return {}
        return touched_keys_on(c, sid, after, upto)


def touched_keys_on(
    c: Conn, sid: str, after: Position | None = None, upto: Position | None = None
) -> dict[str, list[dict]]:
    """`touched_keys`, read on `c` (at a server whose log is installed)."""
    cond, args = _span(after, upto)
    q = f"SELECT DISTINCT tbl, pk FROM migrator.changes WHERE shard_id = %s{cond}"
    rows = c.execute(q, (sid, *args)).fetchall()
    out: dict[str, list[dict]] = {}
    for t, pk in rows:
        out.setdefault(t, []).append(pk)
    return out
