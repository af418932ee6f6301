"""A batch as one stream: the copy's protocol where round trips are dear.

A binary COPY per table waits for the destination twice (the server answers its start and
its end), and the setting that skips the table's triggers once more, so a batch of T
tables crosses the link 3T + 2 times; across an ocean that, not the rows, is what a batch
costs (at 80 ms and the demo's five tables, about 1.4 s a batch). Here every table's rows
of the batch travel in one COPY, as (the table's position, the row's columns as text[]),
into a temporary table at the destination; one message then inserts each table's rows
from it, parents first, checks that each table took what was staged for it, writes the
ledger's row and commits. Four round trips a batch, whatever the number of tables: the
transaction's start, the COPY's start and end, and the rest.

Text is each type's own output and input (what COPY's text format uses), read and written
under the session every connection pins (`stores.postgres.PINNED`: time zone, date style,
float digits), so a row arrives as it left; the verify phase compares every row before
cutover either way. The destination pays for it: a second insert (into the stage, which
is temporary and unlogged) and a parse of every column, about twice the CPU of a binary
COPY of the same rows (`STREAM_FROM_RTT_S` says what was measured), which is why
`copy.protocol: auto` takes it only where the link's round trip pays for that.
"""

from __future__ import annotations

import hashlib
import logging
import time

import psycopg
from psycopg import sql

from migrator.control.context import Context
from migrator.errors import ChecksumMismatch
from migrator.stores import replica, sqlgen
from migrator.stores.postgres import Conn, relay

log = logging.getLogger("migrator.phases.copy")

# A link whose round trip is this long or longer carries a batch as one stream under
# `copy.protocol: auto`. Staging costs the destination about 10 us more per row (measured
# on this project's machine: 200,000 rows of nine mixed columns, 1.65 s by binary COPY,
# 3.68 s staged); a 500-user batch of the demo (about 10,000 rows) is then 0.1 s more,
# which the 13 round trips it saves repay from about 8 ms. Regions are tens of ms apart,
# a data center's own network well under one.
STREAM_FROM_RTT_S = 0.010

CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {sqlgen.STAGE} (tbl int NOT NULL, cols text[] NOT NULL) ON COMMIT DELETE ROWS"
)
STAGE_IN = f"COPY {sqlgen.STAGE} (tbl, cols) FROM STDIN (FORMAT BINARY)"
RAISED = "RMC01"  # unstage's count check


def round_trip(conn: Conn) -> float:
    """The connection's round trip: the time of a bare statement."""
    t0 = time.perf_counter()
    conn.execute("SELECT 1")
    return time.perf_counter() - t0


def hashed_relay(out: psycopg.Copy, inp: psycopg.Copy) -> tuple[hashlib._Hash, int]:
    """Stream a COPY TO into a COPY FROM; the SHA-256 of the bytes sent, and their count."""
    stream = hashlib.sha256()
    sent = 0

    def seen(chunk: bytes) -> None:
        nonlocal sent
        stream.update(chunk)
        sent += len(chunk)

    relay(out, inp, seen)
    return stream, sent


def usable(ctx: Context) -> bool:
    """Whether the graph's tables can be staged (no name holds the block's quoting tag),
    and no setting needs each table's rows apart (`copy.inline_digest`)."""
    names = [t.name for t in ctx.tables.values()] + [c.name for t in ctx.tables.values() for c in t.columns]
    return not ctx.spec.copy_.inline_digest and not any(sqlgen.BATCH_TAG in n for n in names)


def chosen(ctx: Context, dst: Conn, where: str) -> bool:
    """Whether this destination connection's batches go as one stream; if so, its stage is made."""
    protocol = ctx.spec.copy_.protocol
    if protocol == "tables" or not usable(ctx):
        return False
    if protocol == "auto":
        rtt = round_trip(dst)
        if rtt < STREAM_FROM_RTT_S:
            return False
        log.info("%s: round trip %.1f ms, batches go as one stream", where, rtt * 1000)
    dst.execute(CREATE_STAGE)
    return True


def send(
    ctx: Context, src: Conn, dst: Conn, sid: str, batch_no: int, keys: list[str], rep: replica.Replica
) -> tuple[dict[str, int], str, int]:
    """Stream the batch's rows into the destination's open transaction, insert and check
    them, write the ledger's row and commit: (rows per table, the batch's digest, bytes sent)."""
    graph, kt = ctx.spec.entity_graph, ctx.key_type
    tables = list(ctx.tables.values())
    with src.cursor() as scur, dst.cursor() as dcur:
        with scur.copy(sqlgen.stage_out(graph, tables, kt), sqlgen.keys_arg(keys)) as out, dcur.copy(STAGE_IN) as inp:
            stream, sent_bytes = hashed_relay(out, inp)
        sent, taken = scur.rowcount, dcur.rowcount
        if sent != taken or sent < 0:
            raise ChecksumMismatch(
                f"shard {sid} batch {batch_no}: the source sent {sent} rows, the destination staged {taken}"
            )
        digest = hashlib.sha256(f"stream|{taken}|{stream.hexdigest()}".encode()).hexdigest()
        skips = [replica.skips_table(rep, t.name) for t in tables]
        ledger_row = sql.SQL(
            "INSERT INTO migrator.batch_ledger (shard_id, batch_no, last_key, rows, digest) "
            "VALUES ({}, {}, {}, current_setting('migrator.took')::jsonb, {}) RETURNING rows"
        ).format(*map(sql.Literal, (sid, batch_no, keys[-1])), sql.Literal(digest))
        message = sql.SQL("{}; {}; COMMIT").format(sqlgen.unstage(graph, tables, skips), ledger_row)
        try:
            dcur.execute(message.as_string(dst))
        except psycopg.Error as exc:
            if exc.sqlstate == RAISED and exc.diag.message_primary:
                raise ChecksumMismatch(f"shard {sid} batch {batch_no}: {exc.diag.message_primary}") from None
            raise
        dcur.nextset()  # the ledger's row, after the block
        row = dcur.fetchone()
        took: dict[str, int] = row[0] if row else {}
    return {t.name: int(took[t.name]) for t in tables}, digest, sent_bytes
