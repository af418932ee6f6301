"""PostgreSQL connections with the session pinned, so every digest is computed alike.

TimeZone, DateStyle, IntervalStyle, extra_float_digits and bytea_output change the text
form of values; a digest computed under different settings on two sides would report
false mismatches, so every connection the migrator opens sets them the same way.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg import errors as pge
from psycopg.conninfo import conninfo_to_dict

from migrator.errors import StoreRefused, StoreUnavailable

PINNED = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "client_encoding": "UTF8",
    "application_name": "residency-migrator",
}


# What a retry can mend: a lost connection, a server shutting down or not accepting yet,
# a serialization failure or deadlock, a lock or statement timeout, too many connections.
_TRANSIENT = (
    pge.SerializationFailure,
    pge.DeadlockDetected,
    pge.AdminShutdown,
    pge.CrashShutdown,
    pge.CannotConnectNow,
    pge.ConnectionException,
    pge.LockNotAvailable,
    pge.QueryCanceled,
    pge.TooManyConnections,
)


def transient(exc: BaseException) -> bool:
    """Whether an error PostgreSQL's driver raised is one a retry can mend."""
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, psycopg.OperationalError):
        # Connection refused, server closed the connection, SSL drop, ...: all operational.
        return True
    if isinstance(exc, psycopg.InterfaceError):
        return "closed" in str(exc).lower()
    return False


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


KEEPALIVES = {"idle": 10, "interval": 5, "count": 3}  # seconds, seconds, probes

_NAMES: dict[str, str] = {}


def name_store(dsn: str, name: str) -> None:
    """What errors on connections to `dsn` call the store (e.g. 'region ie')."""
    _NAMES[dsn] = name


def where(dsn: str) -> str:
    """The store's name and address, never its password: 'region ie (127.0.0.1:5432/app)'."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        info = {}
    addr = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '?')}"
    return f"{_NAMES.get(dsn, 'a PostgreSQL store')} ({addr})"


# What a failed connection attempt means, from libpq's message (which names no row), and
# whether waiting can mend it.
_CONNECT_REASONS = [
    (r"password authentication failed", "password authentication failed", False),
    (r"database \".*\" does not exist", "the database does not exist", False),
    (r"role \".*\" does not exist", "the role does not exist", False),
    (r"no pg_hba\.conf entry", "pg_hba.conf has no entry for this client", False),
    (r"permission denied for database", "no CONNECT privilege on the database", False),
    (r"Connection refused", "connection refused (the server is down or not on that port)", True),
    (r"timeout expired", "the connection timed out", True),
    (r"starting up|shutting down|in recovery|not yet accepting", "the server is starting or stopping", True),
    (r"too many (clients|connections)", "the server has no free connection", True),
    (r"could not translate host name", "the host name does not resolve", True),
    # a DSN libpq cannot use: named by its parameter, never its value (it may be a secret)
    (r"invalid integer value .* for connection option \"(\w+)\"", "the DSN's {0} is not a number", False),
    (r"invalid port number", "the DSN's port is not a valid port number", False),
    (r"invalid (\w+) value", "the DSN's {0} is not a value libpq knows", False),
    (r"invalid URI query parameter: \"(\w+)\"", "the DSN has a parameter libpq does not know ({0})", False),
    (r"invalid connection option \"(\w+)\"", "the DSN has a parameter libpq does not know ({0})", False),
    (r"missing \"=\" after|unterminated quoted string|invalid URI", "the DSN cannot be parsed", False),
]


def _connect_error(dsn: str, exc: psycopg.Error) -> Exception:
    text = str(exc)
    for pattern, reason, transient in _CONNECT_REASONS:
        if m := re.search(pattern, text, re.I):
            cls = StoreUnavailable if transient else StoreRefused
            return cls(f"{where(dsn)}: {reason.format(*m.groups())}")
    if isinstance(exc, psycopg.ProgrammingError):
        return StoreRefused(f"{where(dsn)}: the DSN cannot be used ({type(exc).__name__})")
    return StoreUnavailable(f"{where(dsn)}: cannot connect ({type(exc).__name__})")


def tag(exc: BaseException, conn: Any) -> None:
    """Mark a driver error with the store it came from (read by `errors.describe`)."""
    if isinstance(exc, psycopg.Error) and not hasattr(exc, "migrator_store"):
        exc.migrator_store = getattr(conn, "store", None)  # type: ignore[attr-defined]


class StoreCursor(psycopg.Cursor[Any]):
    """A cursor whose errors carry the name of their store."""

    def fetchone(self) -> Any:
        """The next row. Typed as a row: the migrator asks for one only of queries that
        return one (an aggregate, a function's value, a RETURNING it checks)."""
        return super().fetchone()

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute(*args, **kwargs)
        except psycopg.Error as exc:
            tag(exc, self.connection)
            raise

    @contextlib.contextmanager
    def copy(self, *args: Any, **kwargs: Any) -> Iterator[psycopg.Copy]:
        try:
            with super().copy(*args, **kwargs) as cp:
                yield cp
        except psycopg.Error as exc:
            tag(exc, self.connection)
            raise


class StoreConnection(psycopg.Connection[Any]):
    """A connection that knows which store it is, for errors that say where."""

    store: str | None = None

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool = False
    ) -> StoreCursor:
        return cast(StoreCursor, super().execute(query, params, prepare=prepare, binary=binary))

    def commit(self) -> None:
        try:
            super().commit()
        except psycopg.Error as exc:
            tag(exc, self)
            raise


Conn = StoreConnection  # what the migrator's modules take as a connection


def connect(dsn: str, *, autocommit: bool = False, connect_timeout: int = 5, keyed: bool = False) -> StoreConnection:
    """A connection with the session pinned; `keyed` for per-batch statements (see KEYED).
    A store that cannot be reached or refuses the login is named in the error."""
    settings = {k: v for k, v in PINNED.items() if k not in ("client_encoding", "application_name")}
    if keyed:
        settings.update(KEYED)
    opts = " ".join(f"-c {k}={v.replace(' ', '')}" for k, v in settings.items())
    if _deadline is not None:
        ms = max(1, int((_deadline - time.monotonic()) * 1000))
        # a session of a worker lost inside the window ends with the window, not when TCP notices
        opts += f" -c statement_timeout={ms} -c lock_timeout={ms}"
        opts += f" -c idle_in_transaction_session_timeout={max(ms, 1000)}"
    # Keepalives both ways: a peer that vanished (a lost host, a cut link) is noticed in
    # about 25 s instead of the system's two hours, by this process and by the server.
    opts += " " + " ".join(f"-c tcp_keepalives_{k}={v}" for k, v in KEEPALIVES.items())
    try:
        conn = StoreConnection.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=connect_timeout,
            keepalives=1,
            keepalives_idle=KEEPALIVES["idle"],
            keepalives_interval=KEEPALIVES["interval"],
            keepalives_count=KEEPALIVES["count"],
            options=opts,
            application_name=PINNED["application_name"],
            client_encoding=PINNED["client_encoding"],
            cursor_factory=StoreCursor,
        )
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:  # unreachable, refused, or a bad DSN
        raise _connect_error(dsn, exc) from None
    conn.store = where(dsn)
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


@dataclass(frozen=True)
class Said:
    """What one statement of a message answered: its command tag, rows affected, and its
    rows (None for a statement that returns none)."""

    status: str
    rowcount: int
    rows: list[tuple[Any, ...]] | None


def send(c: psycopg.Connection, message: str) -> list[Said]:
    """Run several statements (`message`, literals only, on an autocommit connection) as one
    message: one round trip to a store that may be an ocean away. Returns what each
    statement answered, in order; a message that failed inside its own transaction is
    rolled back, so the connection serves the next one."""
    out: list[Said] = []
    with c.cursor() as cur:
        try:
            cur.execute(message)
        except BaseException:
            if c.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                c.execute("ROLLBACK")
            raise
        while True:
            rows = cur.fetchall() if cur.description is not None else None
            out.append(Said(cur.statusmessage or "", cur.rowcount, rows))
            if not cur.nextset():
                return out
