"""Applying the tool's schema histories (Alembic) to a store, on first use or by
`migrator upgrade`, and printing them for a DBA (`migrator upgrade --sql`).

Each history has its own script location beside this module and its own version table
in schema `migrator` (`alembic_version_control`, `..._capture`, `..._ledger`), because the
control database may share a database with the source, where the capture history lives
too. An upgrade runs in one transaction under the history's advisory lock (the same lock
the code that uses those tables takes), so two workers starting at once upgrade once and
a half-applied upgrade cannot be seen. A database at head is recognised by one read and
costs no lock. The histories of the regions' stores (capture, ledger), which may be an
ocean away, go as one message: their SQL rendered here (as `migrator upgrade --sql` prints
it), checked under the lock against the revision it was rendered from (another process
that upgraded meanwhile sends the upgrade back to Alembic's own way).

Each history's first revision adopts the layout the tool wrote before it kept a history:
it creates what is missing and converts what earlier versions left (idempotently), so a
database created by any earlier version, even in the middle of a migration, is brought up
to date in place.

Alembic and SQLAlchemy are imported only to upgrade or print SQL: every task process and
command checks its stores at head, and that check is one read against each history's
`head` declared here (a test holds each equal to its script directory's head).
"""

from __future__ import annotations

import functools
import io
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from migrator import hooks
from migrator.errors import StateVersionError
from migrator.schema import SCHEMA
from migrator.spec import Spec
from migrator.stores.postgres import Conn, connect, send, where

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config
    from alembic.script import ScriptDirectory

HERE = Path(__file__).parent


@dataclass(frozen=True)
class History:
    name: str
    lock: str  # the advisory lock (hashtext) the upgrade and the tables' users share
    head: str  # the newest revision in its script directory
    lock_timeout: str | None = None  # where the application's writers hold locks we may wait on
    # whether an upgrade goes to the store as one message (its SQL rendered here): the
    # histories of stores in the regions, which may be an ocean away
    in_one_message: bool = False

    @property
    def metadata(self) -> sa.MetaData:
        from migrator.schema import tables

        return getattr(tables, self.name)

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.name}"

    @property
    def location(self) -> Path:
        return HERE / self.name


CONTROL = History("control", "migrator:ddl", "control_0005")
# The capture history's upgrades touch tables the application's triggers write to; a lock
# they cannot get within 2 s is a transient failure, retried, not a stall of the writers.
CAPTURE = History("capture", "migrator:capture", "capture_0003", lock_timeout="2s", in_one_message=True)
LEDGER = History("ledger", "migrator:ledger", "ledger_0003", in_one_message=True)
HISTORIES = {h.name: h for h in (CONTROL, CAPTURE, LEDGER)}


def _config(h: History, buffer: io.StringIO | None = None) -> Config:
    from alembic.config import Config

    cfg = Config(output_buffer=buffer)
    cfg.set_main_option("script_location", str(h.location))
    cfg.attributes["history"] = h
    return cfg


@functools.cache
def _script(name: str) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config(HISTORIES[name]))


def script_head(h: History) -> str | None:
    """The newest revision in the history's script directory, as Alembic reads it."""
    return _script(h.name).get_current_head()


def revisions(h: History) -> list[str]:
    """Every revision of the history, oldest first."""
    return [s.revision for s in reversed(list(_script(h.name).walk_revisions()))]


def current(dsn: str, h: History, conn: Conn | None = None) -> str | None:
    """The store's revision of the history, or None where it has none yet (read on `conn`
    where given, an autocommit connection to `dsn`)."""
    with nullcontext(conn) if conn is not None else connect(dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.{h.version_table}",)).fetchone()[0] is None:
            return None
        row = c.execute(f"SELECT version_num FROM {SCHEMA}.{h.version_table}").fetchone()
    return row[0] if row else None


def ensure(dsn: str, h: History, conn: Conn | None = None) -> None:
    """Bring the store's tables of history `h` to head (one read when they are, on `conn`
    where given); refuse a store at a revision this migrator does not know (written by a
    newer version)."""
    found = current(dsn, h, conn)
    if found != h.head:
        if found is not None and found not in revisions(h):
            raise StateVersionError(
                f"{where(dsn)}: its {h.name} tables are at schema revision {found}, which this migrator "
                f"does not know (its newest is {h.head}); it will not read or change them"
            )
        upgrade(dsn, h, found)


# Raised by an upgrade sent as one message when, once it holds the history's lock, the store
# is no longer at the revision its SQL was rendered from (another process upgraded it).
MOVED_ON = "RMH01"


def upgrade(dsn: str, h: History, since: str | None = None) -> list[str]:
    """Apply the revisions the store lacks (it was at `since` when read, for a history sent
    in one message), in one transaction under the history's lock; returns the revisions
    applied (none when another process got there first)."""
    if h.in_one_message:
        try:
            return _upgrade_in_one_message(dsn, h, since)
        except psycopg.Error as exc:
            if exc.sqlstate != MOVED_ON:
                raise
        # another process upgraded the store meanwhile: whatever it left is done online
    import sqlalchemy as sa
    from alembic import command
    from sqlalchemy.pool import NullPool

    applied: list[str] = []
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: connect(dsn), poolclass=NullPool)
    try:
        with engine.connect() as conn, conn.begin():
            if h.lock_timeout:
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{h.lock_timeout}'")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock(hashtext('{h.lock}'))")
            conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            cfg = _config(h)
            cfg.attributes["connection"] = conn
            cfg.attributes["applied"] = applied
            command.upgrade(cfg, "head")
    except sa.exc.DBAPIError as exc:  # the driver's error, classified like every other
        if isinstance(exc.orig, Exception):
            raise exc.orig from None
        raise
    finally:
        engine.dispose()
    return applied


def sql(h: History, since: str | None = None, *, expect: bool = False) -> str:
    """The SQL that brings a store of history `h` from `since` (default: nothing) to head,
    as a DBA would apply it by hand, version table included; connects to nothing. With
    `expect`, it first checks, under the history's lock, that the store is still at
    `since` (SQLSTATE `MOVED_ON` otherwise)."""
    from alembic import command

    buf = io.StringIO()
    cfg = _config(h, buf)
    if expect:
        cfg.attributes["expect"] = (since,)
    command.upgrade(cfg, f"{since}:head" if since else "head", sql=True)
    return buf.getvalue()


def _upgrade_in_one_message(dsn: str, h: History, since: str | None) -> list[str]:
    """The upgrade's SQL rendered here and sent as one message: one round trip, where
    Alembic's own conversation with the store takes dozens."""
    script = sql(h, since, expect=True)
    known = revisions(h)
    applied = known[known.index(since) + 1 :] if since in known else known
    with connect(dsn, autocommit=True) as c:
        send(c, script)
    return applied


def _still_at(h: History, since: str | None) -> str:
    """A block raising `MOVED_ON` unless the store's version of `h` is `since`."""
    table = f"{SCHEMA}.{h.version_table}"
    want = "NULL" if since is None else f"'{since}'"
    return (
        f"DO $rm$DECLARE v text; BEGIN IF to_regclass('{table}') IS NOT NULL THEN "
        f"SELECT version_num INTO v FROM {table}; END IF; IF v IS DISTINCT FROM {want} THEN "
        f"RAISE EXCEPTION 'the {h.name} tables moved on' USING ERRCODE = '{MOVED_ON}'; END IF; END$rm$"
    )


def run_env(context: Any) -> None:
    """The body of each script location's env.py; `context` is `alembic.context`, the
    proxy of the running EnvironmentContext."""
    cfg = context.config
    h: History = cfg.attributes.get("history") or HISTORIES[Path(cfg.get_main_option("script_location") or "").name]
    opts = dict(
        version_table=h.version_table,
        version_table_schema=SCHEMA,
        target_metadata=h.metadata,
        transactional_ddl=True,
    )
    if context.is_offline_mode():
        context.configure(dialect_name="postgresql", literal_binds=True, **opts)  # type: ignore[arg-type]
        with context.begin_transaction():
            if h.lock_timeout:
                context.execute(f"SET LOCAL lock_timeout = '{h.lock_timeout}'")
            context.execute(f"SELECT pg_advisory_xact_lock(hashtext('{h.lock}'))")
            context.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            if "expect" in cfg.attributes:
                context.execute(_still_at(h, cfg.attributes["expect"][0]))
            context.run_migrations()
        return
    applied: list[str] = cfg.attributes.get("applied", [])

    def done(*, step: Any, **_: Any) -> None:
        applied.append(step.up_revision_id)
        hooks.point(f"upgraded {step.up_revision_id}")  # still inside the upgrade's one transaction

    context.configure(
        connection=cfg.attributes["connection"],
        on_version_apply=done,
        **opts,  # type: ignore[arg-type]
    )
    with context.begin_transaction():
        context.run_migrations()


def targets(spec: Spec) -> list[tuple[str, str, History]]:
    """(store, dsn, history) for every store of the spec: the control tables in the control
    database, capture at the source and at each destination (a rollback captures there),
    the batch ledger at each destination."""
    out = [("control database", spec.control.url, CONTROL)]
    out.append((f"source {spec.source_region}", spec.regions[spec.source_region].url, CAPTURE))
    for r in spec.targets:
        out += [(f"destination {r}", spec.regions[r].url, h) for h in (CAPTURE, LEDGER)]
    return out


def upgrade_all(spec: Spec) -> list[dict[str, Any]]:
    """`migrator upgrade`: every store of the spec to head; what each was at and got."""
    done = []
    for store, dsn, h in targets(spec):
        before = current(dsn, h)
        ensure(dsn, h)
        done.append({"store": store, "history": h.name, "from": before, "to": h.head, "upgraded": before != h.head})
    return done


def sql_all(spec: Spec) -> str:
    """`migrator upgrade --sql`: each history's SQL once, headed by the stores it is for."""
    parts = []
    for h in HISTORIES.values():
        stores = [f"{s} ({where(d)})" for s, d, x in targets(spec) if x is h]
        parts.append(f"-- {h.name} tables, for: {'; '.join(stores)}\n{sql(h)}")
    return "\n".join(parts)
