"""PostgreSQL connections with the session pinned, so every digest is computed alike.

TimeZone, DateStyle, IntervalStyle, extra_float_digits and bytea_output change the text
form of values; a digest computed under different settings on two sides would report
false mismatches, so every connection the migrator opens sets them the same way.
"""
from __future__ import annotations

import contextlib
import time

import psycopg

PINNED = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "client_encoding": "UTF8",
    "application_name": "residency-migrator",
}


_deadline: float | None = None


@contextlib.contextmanager
def bounded(deadline: float):
    """Every connection opened inside gets statement and lock timeouts that end at
    `deadline` (a time.monotonic() value): a fenced step cannot wait past its window."""
    global _deadline
    _deadline = deadline
    try:
        yield
    finally:
        _deadline = None


# For sessions whose statements each read one batch of users (`= ANY(keys)` on the owner
# key): such a batch is a sliver of each table and is found through the owner-key indexes.
# Left to its costs, the planner may prefer a full scan of a large child table hashed
# against the batch's parent rows; repeated for every batch, that makes a copy's time grow
# with the square of the data. Here a scan is the last resort, taken only where a table has
# no usable index.
KEYED = {"enable_seqscan": "off"}


def connect(dsn: str, *, autocommit: bool = False, connect_timeout: int = 5, keyed: bool = False) -> psycopg.Connection:
    """A connection with the session pinned; `keyed` for per-batch statements (see KEYED)."""
    settings = {k: v for k, v in PINNED.items() if k not in ("client_encoding", "application_name")}
    if keyed:
        settings.update(KEYED)
    opts = " ".join(f"-c {k}={v.replace(' ', '')}" for k, v in settings.items())
    if _deadline is not None:
        ms = max(1, int((_deadline - time.monotonic()) * 1000))
        opts += f" -c statement_timeout={ms} -c lock_timeout={ms}"
    conn = psycopg.connect(
        dsn,
        autocommit=autocommit,
        connect_timeout=connect_timeout,
        options=opts,
        application_name=PINNED["application_name"],
        client_encoding=PINNED["client_encoding"],
    )
    return conn


CHUNK = 64 * 1024


def relay(out: psycopg.Copy, inp: psycopg.Copy, seen=None) -> None:
    """Stream a COPY TO into a COPY FROM without holding more than a chunk.

    The source yields one message per row; handing each to the destination would cost a
    round of the driver's send loop per row, so rows are gathered into chunks first.
    `seen`, if given, is called with every chunk sent (e.g. a hash's update)."""
    buf = bytearray()
    for block in out:
        buf += block
        if len(buf) >= CHUNK:
            chunk = bytes(buf)
            buf.clear()
            if seen is not None:
                seen(chunk)
            inp.write(chunk)
    if buf:
        chunk = bytes(buf)
        if seen is not None:
            seen(chunk)
        inp.write(chunk)


def pipe(src: psycopg.Connection, copy_out, params, dst: psycopg.Connection, copy_in) -> int:
    """Rows of `copy_out` (a COPY ... TO STDOUT) at `src` into `copy_in` (a COPY ... FROM
    STDIN) at `dst`, streamed; the number of rows `dst` took."""
    with src.cursor() as sc, dst.cursor() as dc:
        with sc.copy(copy_out, params) as out, dc.copy(copy_in) as inp:
            relay(out, inp)
        return dc.rowcount
