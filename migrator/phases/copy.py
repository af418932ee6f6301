"""Copies a shard in verified, resumable batches.

Design
------
A batch is a fixed set of users (formed by the planner). For each batch the source is
read in one REPEATABLE READ snapshot and every table of the graph is streamed, parents
first, with binary COPY straight into one destination transaction. Before that
transaction commits, every table's row count as the source sent it (its COPY TO) must
equal the count the destination took (its COPY FROM), and a row is added to the
destination's batch ledger with those counts and a SHA-256 of the exact bytes streamed.
The ledger is the destination's own record of what this tool wrote, committed atomically
with the rows:

* a crash after the destination commit but before the control checkpoint is healed on
  resume from the ledger, so a batch is never written twice;
* rows of a batch's users found at the destination without a ledger row were written by
  someone else: a conflict, refused and named.

Row contents are compared by the verify phase, one pass per table over the whole shard on
both sides at once, which must pass before cutover. Comparing digests batch by batch as
well (`copy.inline_digest`) finds a difference earlier but reads every row twice more;
it is off by default.

Progress (the checkpoint) is recorded only after the destination committed, so it counts
what was committed, never what was sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from migrator import capture, hooks, metrics
from migrator.control.context import Context
from migrator.control.membership import BatchRecord
from migrator.control.state import State
from migrator.errors import ChecksumMismatch, ConflictError
from migrator.lanes import in_lanes
from migrator.phases import copy_objects, copy_stream, move_back
from migrator.schema import history
from migrator.shard import objects
from migrator.stores import is_transient, replica, sqlgen
from migrator.stores.postgres import Conn, connect
from migrator.throttle import Throttle

log = logging.getLogger("migrator.phases.copy")


def batch_digest(parts: dict[str, tuple[int, str]]) -> str:
    """One digest over a batch's per-table (row count, stream SHA-256) pairs."""
    text = "\n".join(f"{t}|{n}|{s}" for t, (n, s) in sorted(parts.items()))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CopyResult:
    batches: int
    copied_now: int
    rows: Mapping[str, int]


class _Links:
    """The source and destination connections of one copy, reopened after a transient error."""

    def __init__(self, ctx: Context, src: str, dst: str, where: str):
        self.ctx, self.src_dsn, self.dst_dsn, self.where = ctx, src, dst, where
        self.src: Conn | None = None
        self.dst: Conn | None = None
        self.stream = False  # whether the destination's batches go as one stream (copy_stream)

    def open(self) -> tuple[Conn, Conn]:
        if self.src is None or self.src.closed:
            self.src = connect(self.src_dsn, keyed=True)
            self.src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self.src.read_only = True
        if self.dst is None or self.dst.closed:
            # each batch's transaction is begun and committed by its own statements, folded
            # with the batch's first and last: no round trip of their own across the ocean
            self.dst = connect(self.dst_dsn, keyed=True, autocommit=True)
            self.stream = copy_stream.chosen(self.ctx, self.dst, self.where)
        return self.src, self.dst

    def reset(self) -> None:
        for c in (self.src, self.dst):
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
        self.src = self.dst = None


def ledger(c: Conn, dsn: str, sid: str) -> dict[int, BatchRecord]:
    """The destination's batch ledger of the shard (`c` on `dsn`), at the head of its schema history."""
    history.ensure(dsn, history.LEDGER, c)
    rows = c.execute(
        "SELECT batch_no, last_key, rows, digest FROM migrator.batch_ledger WHERE shard_id = %s", (sid,)
    ).fetchall()
    return {b: BatchRecord(k, r, d) for b, k, r, d in rows}


def _send_tables(
    ctx: Context, src: Conn, dst: Conn, sid: str, batch_no: int, keys: list[str], rep: replica.Replica
) -> tuple[dict[str, int], str, int]:
    """A binary COPY per table into the destination's open transaction, then the ledger's
    row and the commit: (rows per table, the batch's digest, bytes sent)."""
    graph, kt = ctx.spec.entity_graph, ctx.key_type
    rows: dict[str, int] = {}
    parts: dict[str, tuple[int, str]] = {}
    moved_bytes = 0
    with src.cursor() as scur, dst.cursor() as dcur:
        for name, table in ctx.tables.items():
            replica.set_for(dst, rep, name)
            with (
                scur.copy(sqlgen.copy_out(graph, table, kt), sqlgen.keys_arg(keys)) as out,
                dcur.copy(sqlgen.copy_in(graph, table)) as inp,
            ):
                stream, sent_bytes = copy_stream.hashed_relay(out, inp)
                moved_bytes += sent_bytes
            sent, taken = scur.rowcount, dcur.rowcount
            if sent != taken or sent < 0:
                raise ChecksumMismatch(
                    f"shard {sid} batch {batch_no}: table {name}: the source sent {sent} rows, "
                    f"the destination took {taken}"
                )
            rows[name] = taken
            parts[name] = (taken, stream.hexdigest())
            if ctx.spec.copy_.inline_digest:
                dq = sqlgen.digest_keys(graph, table, kt)
                ((s_n, s_sum),) = scur.execute(dq, sqlgen.keys_arg(keys)).fetchall()
                ((d_n, d_sum),) = dcur.execute(dq, sqlgen.keys_arg(keys)).fetchall()
                if (s_n, s_sum) != (d_n, d_sum) or d_n != taken:
                    raise ChecksumMismatch(
                        f"shard {sid} batch {batch_no}: table {name} differs right after copy "
                        f"(source {s_n} rows, destination {d_n} rows)"
                    )
        digest = batch_digest(parts)
        # the ledger's row and the commit in one message (literals: a statement with
        # parameters travels alone)
        dcur.execute(
            sql.SQL(
                "INSERT INTO migrator.batch_ledger (shard_id, batch_no, last_key, rows, digest) "
                "VALUES ({}, {}, {}, {}, {}); COMMIT"
            )
            .format(*map(sql.Literal, (sid, batch_no, keys[-1], json.dumps(rows), digest)))
            .as_string(dst)
        )
    return rows, digest, moved_bytes


def _copy_batch(
    ctx: Context,
    links: _Links,
    sid: str,
    region: str,
    batch_no: int,
    keys: list[str],
    rep: replica.Replica,
    returning: frozenset[str] = frozenset(),
) -> BatchRecord:
    graph, kt = ctx.spec.entity_graph, ctx.key_type
    src, dst = links.open()
    try:
        dst.execute("BEGIN; SET LOCAL migrator.apply = 'on'")  # this tool's own writes pass the guards
        back = [k for k in keys if k in returning]
        if back:  # users moving back: what an earlier move of theirs left here is replaced
            move_back.clear_objects(ctx, dst, region, back)  # before the rows that name them go
            for table in reversed(list(ctx.tables.values())):
                replica.set_for(dst, rep, table.name)
                dst.execute(sqlgen.delete_keys(graph, table, kt), sqlgen.keys_arg(back))
        t0 = time.monotonic()
        if links.stream:
            rows, digest, moved_bytes = copy_stream.send(ctx, src, dst, sid, batch_no, keys, rep)
        else:
            rows, digest, moved_bytes = _send_tables(ctx, src, dst, sid, batch_no, keys, rep)
        src.rollback()
        took = max(time.monotonic() - t0, 1e-6)
        n = sum(rows.values())
        metrics.batch_copied(sid, region, rows, moved_bytes)
        log.info(
            "shard %s batch %d: %d rows, %.1f MB in %.2f s (%.0f rows/s, %.1f MB/s)",
            sid,
            batch_no,
            n,
            moved_bytes / 1e6,
            took,
            n / took,
            moved_bytes / 1e6 / took,
        )
        return BatchRecord(keys[-1], rows, digest)
    except BaseException as exc:
        if is_transient(exc):
            links.reset()
        else:
            for c in (dst, src):
                try:
                    c.rollback()
                except Exception:  # noqa: BLE001
                    links.reset()
        raise


def _check_no_foreign_rows(
    ctx: Context,
    c: Conn,
    sid: str,
    pending: list[int],
    batches: Mapping[int, list[str]],
    returning: frozenset[str] = frozenset(),
) -> None:
    """Refuse batches whose users already have rows at the destination: a batch not in the
    ledger was never committed there by this tool, so such rows were written by someone else
    (but for users moving back, whose rows an earlier move of theirs left there).

    It runs for every pending batch before any is copied: once workers are writing, a scan
    of a destination table would also wade through the sibling batches' uncommitted rows,
    which statistics taken before the load do not foresee. A row written by someone else
    during the copy is found by the verify phase as extra at the destination."""
    graph, kt = ctx.spec.entity_graph, ctx.key_type
    # A table without a single row has none of these users' rows: the usual case of a
    # first copy costs one probe of every table at once instead of one per batch.
    tables = list(ctx.tables.values())
    (found,) = c.execute(sqlgen.any_rows(graph, tables)).fetchone()
    occupied = {t.name: t for t, yes in zip(tables, found, strict=True) if yes}
    for b in pending if occupied else []:
        keys = [k for k in batches[b] if k not in returning]
        for name, table in occupied.items() if keys else ():
            rows = c.execute(sqlgen.existing_pks(graph, table, kt), sqlgen.keys_arg(keys)).fetchall()
            if rows:
                pks = [dict(zip(table.pk, r)) for r in rows]
                raise ConflictError(
                    f"shard {sid} batch {b}: destination table {name} already has rows for these users "
                    f"that this tool did not write, e.g. primary keys {pks}"
                )


def _copy_pending(
    ctx: Context,
    sid: str,
    region: str,
    src_dsn: str,
    dst_dsn: str,
    batches: Mapping[int, list[str]],
    pending: list[int],
    rep: replica.Replica,
    returning: frozenset[str],
) -> Iterator[tuple[int, BatchRecord]]:
    """Copy the pending batches with `copy.workers` lanes (each on its own source and
    destination connections), yielding each as it commits; the caller checkpoints it."""
    # An inline digest reads the destination tables inside the batch's transaction; with
    # sibling batches loading the same tables it would wade through their uncommitted rows.
    n = ctx.spec.copy_.lanes
    throttle = Throttle(ctx, sid)

    def one(links: _Links, b: int) -> BatchRecord:
        throttle.wait()
        res = _copy_batch(ctx, links, sid, region, b, batches[b], rep, returning)
        throttle.done(sum(res.rows.values()))
        hooks.point("committed batch", ctx, sid)  # in the lane, before its next batch
        return res

    yield from in_lanes(
        pending,
        one,
        n,
        f"copy-{sid}",
        setup=lambda: _Links(ctx, src_dsn, dst_dsn, f"shard {sid}: destination {region}"),
        teardown=lambda links: links.reset(),
    )


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def copy_shard(ctx: Context, sid: str, progress: Callable[[int, int], None] | None = None) -> CopyResult:
    """Copy every batch of the shard not yet committed; the caller holds the shard's lock."""
    ctl = ctx.control
    shard = ctl.shard(sid)
    src_dsn, dst_dsn = ctx.origin_dsn(shard), ctx.dsn(shard.region)
    # what the destination holds, read on one connection: its round trips may cross an ocean
    with connect(dst_dsn, autocommit=True, keyed=True) as dc:
        ctx.check_destination(shard.region, dc)
        if shard.state != State.COPYING:
            ctl.move(sid, shard.state, State.COPYING, {"event": "copy started"})
        # A failure is classified (transient: resumable; terminal: failed) by `dispatch`.
        if ctx.spec.changes.capture:  # before the first snapshot: every later change is logged
            capture.start_capture(ctx, src_dsn, sid)
        done_at_dest = ledger(dc, dst_dsn, sid)
        wanted = ctx.spec.copy_.skip_edge_checks
        rep = replica.read(dc, ctx.spec.entity_graph, f"destination {shard.region}") if wanted else replica.NONE
        batches = ctl.batch_keys(sid, ctx.sort_keys)
        # The destination's ledger is the truth of what is committed there: a checkpoint
        # whose ledger row is gone (e.g. a destination that lost recent commits in a
        # crash) is copied again.
        done = {b: cp for b, cp in ctl.checkpoints(sid).items() if b in done_at_dest}
        for b, entry in done_at_dest.items():  # committed at the destination, checkpoint lost
            if b not in done:
                ctl.save_checkpoint(sid, b, entry)
                done[b] = entry
        copied_now = 0
        total = len(batches)
        if progress:
            progress(len(done), total)
        pending = [b for b in sorted(batches) if b not in done]
        returning = frozenset(move_back.make_room(ctx, shard))  # users moving back, and room made for them
        _check_no_foreign_rows(ctx, dc, sid, pending, batches, returning)
    started = time.monotonic()
    for b, res in _copy_pending(ctx, sid, shard.region, src_dsn, dst_dsn, batches, pending, rep, returning):
        ctl.save_checkpoint(sid, b, res)
        done[b] = res
        copied_now += 1
        left = total - len(done)
        eta = (time.monotonic() - started) / copied_now * left
        log.info(
            "shard %s: rows of batch %d/%d committed (batch %d), ETA %s%s",
            sid,
            len(done),
            total,
            b,
            _duration(eta),
            " (then the objects)" if objects.enabled(ctx) else "",
        )
        if progress:
            progress(len(done), total)
        hooks.point("copied batch", ctx, sid)
    if ctx.spec.changes.capture:
        hooks.point("catch_up", ctx, sid)
        n = capture.catch_up(ctx, sid, src_dsn, dst_dsn, "forward", pending_at_most=ctx.spec.changes.catch_up_below)
        log.info("shard %s: %d captured change(s) applied", sid, n)
    listed: dict[str, str] = {}
    if objects.enabled(ctx):
        moved = copy_objects.copy_batches(ctx, sid, shard.region, ctx.origin(shard), batches)
        log.info("shard %s objects: %d copied, %d already there", sid, moved.copied, moved.skipped)
        listed = moved.listed
    rows: dict[str, int] = {}
    for entry in done.values():
        for t, n in entry.rows.items():
            rows[t] = rows.get(t, 0) + n
    detail = {"event": "copied", "batches": len(done), "rows": rows, "edge_checks_skipped": rep.skipped()}
    if listed:  # how the object stores were listed (see `shard.objects.page_budget`)
        detail["objects_listed"] = listed
    ctl.move(sid, State.COPYING, State.COPIED, detail, error=None)
    return CopyResult(len(done), copied_now, rows)
