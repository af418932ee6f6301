"""Every error the migrator raises, and how any error is described without its values.

Which errors are transient is said by each store where its driver is called
(`migrator.stores.is_transient`); this module holds the migrator's own kinds. Messages
never carry a row's contents: tables, key columns and key values only.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

import psycopg

from migrator.differences import Difference


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

    def __init__(self, message: str, differences: Sequence[Difference] = ()):
        super().__init__(message)
        self.differences: tuple[Difference, ...] = tuple(differences)


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


class ControlUnavailable(StoreUnavailable):
    """The control database stayed away longer than the outage its calls ride out: no one
    in this process retries again; the task's next run (Airflow's retry, a rerun) does."""


class StoreRefused(SpecError):
    """A store refuses the migrator (wrong password, no such database or role, no CONNECT
    privilege) or its DSN is malformed: waiting does not mend it, and it is the command's
    configuration, not the shard's failure (exit 2, the shard keeps its state)."""


class ObjectRefused(MigratorError):
    """An object store refused an operation on some objects (a bucket policy, say): the
    shard's phase fails, named with the bucket, the first key and the store's code."""


class CatchUpBlocked(TransientError):
    """A catch-up pass outside the fence waited too long for a lock another transaction
    holds; nothing was applied by that pass, and the step is retried later."""


class ObjectMissing(MigratorError):
    """An object the key column names is not at the source endpoint: the rows and the
    store disagree, which a retry does not mend."""


class ObjectVanished(TransientError):
    """A source object was deleted between its listing and its copy; the batch is listed again."""


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
    if endpoint:  # botocore's EndpointConnectionError and its kind: the endpoint and the bucket
        # (path-style), never the rest of the request (an object's key, a listing's prefix: they
        # name a user)
        u = urlsplit(str(endpoint))
        bucket = u.path.strip("/").split("/", 1)[0]
        return f"S3 endpoint {u.scheme}://{u.netloc}/{bucket} cannot be reached ({type(exc).__name__})"
    return type(exc).__name__
