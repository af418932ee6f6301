"""Every error the migrator raises, and the one place that says which are transient.

Transient errors (a lost connection, a server shutting down, a serialization failure,
S3 throttling or 5xx) are retried with backoff; everything else is terminal. Messages
never carry a row's contents: tables, key columns and key values only.
"""

from __future__ import annotations

import psycopg
from psycopg import errors as pge
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential


class MigratorError(Exception):
    """Base of the migrator's own errors."""

    exit_code = 1


class SpecError(MigratorError):
    """The spec (or the command line) is wrong; nothing was written."""

    exit_code = 2


class SchemaMismatch(SpecError):
    """The spec and a database disagree (a name it uses is missing, a foreign key it names
    is not declared, a destination table differs from the source): a spec problem."""


class PrivilegeMissing(SpecError):
    """The role a store is reached with lacks a privilege the migrator needs; named with
    the store, the privilege and the object. Found by `plan` before anything is written."""


class ConflictError(MigratorError):
    """Rows for a shard's users exist at the destination that this tool did not write."""


class ChecksumMismatch(MigratorError):
    """Source and destination disagree; `differences` names tables and primary keys."""

    def __init__(self, message: str, differences: list[dict] | None = None):
        super().__init__(message)
        self.differences = differences or []


class StateConflict(MigratorError):
    """A compare-and-set on a shard's state lost: another worker moved it, or the move is not allowed."""


class ShardBusy(StateConflict):
    """Another worker holds the shard."""


class StateVersionError(MigratorError):
    """The migrator's tables in a store are at a schema revision this version does not
    know (a newer version wrote them): run that version, not this one."""

    exit_code = 2


class PurgeRefused(MigratorError):
    """A purge's precondition does not hold (not due yet, no key, ...): nothing was touched."""


class TransientError(MigratorError):
    """Raised by the migrator itself for conditions a retry can fix."""


class StoreUnavailable(TransientError):
    """A store cannot be reached now (down, restarting, timing out); named with its address."""


class StoreRefused(MigratorError):
    """A store refuses the migrator (wrong password, no such database or role, no CONNECT
    privilege): waiting does not mend it."""


class CatchUpBlocked(TransientError):
    """A catch-up pass outside the fence waited too long for a lock another transaction
    holds; nothing was applied by that pass, and the step is retried later."""


class ObjectMissing(MigratorError):
    """An object the key column names is not at the source endpoint: the rows and the
    store disagree, which a retry does not mend."""


class ObjectVanished(TransientError):
    """A source object was deleted between its listing and its copy; the batch is listed again."""


_TRANSIENT_PG = (
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


def retry_later(exc: BaseException) -> bool:
    """Whether an orchestrator should run the task again later: a transient error, or a
    shard another worker still holds (its holder finishes or dies, and a dead holder's
    lock ends with its database session). The command line waits for a busy shard
    itself (`engine.each`)."""
    return isinstance(exc, ShardBusy) or is_transient(exc)


def is_transient(exc: BaseException) -> bool:
    """The single classification of errors into transient (retry) and terminal."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, MigratorError):
        return False
    if isinstance(exc, _TRANSIENT_PG):
        return True
    if isinstance(exc, psycopg.OperationalError):
        # Connection refused, server closed the connection, SSL drop, ...: all operational.
        return True
    if isinstance(exc, psycopg.InterfaceError):
        return "closed" in str(exc).lower()
    try:
        from botocore.exceptions import ClientError, HTTPClientError, ReadTimeoutError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover
        return False
    # HTTPClientError: the connection closed or broke mid-request (ConnectionClosedError)
    if isinstance(exc, (BotoConnectionError, ReadTimeoutError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        # PreconditionFailed: a source object changed between its listing and the GET
        # conditional on the listed ETag; the retry lists the batch again.
        return status >= 500 or code in {
            "Throttling",
            "ThrottlingException",
            "SlowDown",
            "RequestTimeout",
            "PreconditionFailed",
        }
    return isinstance(exc, (ConnectionError, TimeoutError))


# SQLSTATE classes whose primary message names objects (tables, columns, constraints,
# privileges, types) and never a row's values; other classes' messages (data exceptions
# quote the bad value, a trigger's RAISE may quote anything) are left out.
_SAFE_PRIMARY = ("08", "23", "25", "40", "42", "53", "55", "57", "58", "RM")


def describe(exc: BaseException) -> str:
    """A one-line description safe for logs and messages: the store, what went wrong in
    words where that cannot carry row data, the objects named (table, column, constraint),
    the error's class and SQLSTATE; never values."""
    if isinstance(exc, MigratorError):
        return str(exc)
    if isinstance(exc, psycopg.Error):
        state = getattr(exc, "sqlstate", None) or ""
        diag = exc.diag
        words = diag.message_primary if state[:2] in _SAFE_PRIMARY and diag.message_primary else ""
        if not words and isinstance(exc, psycopg.OperationalError):
            words = "the connection was lost" if "closed" in str(exc).lower() or "terminat" in str(exc).lower() else ""
        named = [
            f"{k} {v}"
            for k, v in (
                ("schema", diag.schema_name),
                ("table", diag.table_name),
                ("column", diag.column_name),
                ("constraint", diag.constraint_name),
            )
            if v
        ]
        store = getattr(exc, "migrator_store", None)
        head = f"{store}: " if store else ""
        tail = f"{type(exc).__name__}" + (f", SQLSTATE {state}" if state else "")
        body = "; ".join(x for x in [words, ", ".join(named)] if x)
        return f"{head}{body} ({tail})" if body else f"{head}{tail}"
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore's ClientError: its code and call
        code = response["Error"].get("Code", "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return f"S3 {getattr(exc, 'operation_name', '?')}: {code} (HTTP {status}, {type(exc).__name__})"
    endpoint = (
        getattr(exc, "kwargs", {}).get("endpoint_url") if isinstance(getattr(exc, "kwargs", None), dict) else None
    )
    if endpoint:  # botocore's EndpointConnectionError and its kind
        return f"S3 endpoint {endpoint} cannot be reached ({type(exc).__name__})"
    return type(exc).__name__


def retrying(settings, also_not: tuple[type[BaseException], ...] = ()) -> Retrying:
    """A tenacity policy that retries only transient errors (but those of `also_not`)."""
    return Retrying(
        retry=retry_if_exception(lambda e: is_transient(e) and not isinstance(e, also_not)),
        stop=stop_after_attempt(settings.attempts),
        wait=wait_exponential(multiplier=settings.initial_wait_s, max=settings.max_wait_s),
        reraise=True,
    )


def riding_out(seconds: float) -> Retrying:
    """A tenacity policy for the control database: transient errors are retried for up to
    `seconds` (a restart, a failover), not a fixed number of times."""
    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(seconds),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        reraise=True,
    )
