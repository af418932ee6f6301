"""The tool's own tables as SQLAlchemy Core metadata: what each schema history's head
revision leaves in schema `migrator`.

Three histories, because the tables live on different servers (ARCHITECTURE.md):
`CONTROL` in the control database, `CAPTURE` wherever changes are captured or writes
fenced (the source, and a destination after cutover), `LEDGER` at each destination. The
revisions under `control/`, `capture/` and `ledger/` build these; a test compares a
database upgraded to head with this metadata, so the two cannot drift apart.

The hot paths (COPY, digests, catch-up) use psycopg and plain SQL, not these objects.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.types import UserDefinedType

from migrator.schema import SCHEMA

DIRECTORY_FILLFACTOR = 45


class XID8(UserDefinedType):
    """PostgreSQL's 64-bit transaction id (`pg_current_xact_id()`)."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


ischema_names["xid8"] = XID8  # so reflection (the schema test's comparison) knows it too


TZ = TIMESTAMP(timezone=True)
NOW = text("now()")

control = MetaData(schema=SCHEMA)

Table("meta", control, Column("key", Text, primary_key=True), Column("value", Text, nullable=False))

Table(
    "shard",
    control,
    Column("shard_id", Text, primary_key=True),
    Column("wave", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("region", Text, nullable=False),
    Column("idx", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("version", BigInteger, nullable=False, server_default=text("0")),
    Column("users", Integer, nullable=False),
    Column("batches", Integer, nullable=False),
    Column("plan", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("digest", Text),
    Column("error", Text),
    Column("created_at", TZ, nullable=False, server_default=NOW),
    Column("updated_at", TZ, nullable=False, server_default=NOW),
    # what the state machine keeps beside the state (revision control_0003)
    Column("state_since", TZ, nullable=False, server_default=text("clock_timestamp()")),  # when it entered its state
    Column("finalized_at", TZ),  # its capture removed by cleanup: no rollback after it
    Column("rollback_reason", Text),  # the reason of the rollback asked for
    Column("last_verify", JSONB),  # its last verify: matched, digest, rows, differences
    Column("approval", JSONB),  # the answer to its cutover since that verify (and the run's id)
    Column("frozen", JSONB),  # its source copy as the cutover left it: digest, rows and digest per table (0004)
    Column("origin", Text),  # the region its users move from; empty: the spec's source region (0005)
)


def _shard_fk() -> ForeignKey:
    return ForeignKey(f"{SCHEMA}.shard.shard_id", ondelete="CASCADE")


Table(
    "shard_user",
    control,
    Column("shard_id", Text, _shard_fk(), primary_key=True),
    Column("user_key", Text, primary_key=True),
    Column("batch_no", Integer, nullable=False),
    Index("shard_user_key", "user_key"),
    Index("shard_user_batch", "shard_id", "batch_no"),
)

Table(
    "checkpoint",
    control,
    Column("shard_id", Text, _shard_fk(), primary_key=True),
    Column("batch_no", Integer, primary_key=True),
    Column("last_key", Text, nullable=False),
    Column("rows", JSONB, nullable=False),
    Column("digest", Text, nullable=False),
    Column("at", TZ, nullable=False, server_default=NOW),
)

# Pages of the directory are kept under half full, so a cutover's flip of a shard's users
# writes each new row version beside the old one and leaves the key's index alone (a
# heap-only update), which halves the flip a cutover prepares before its fence.
Table(
    "directory",
    control,
    Column("user_key", Text, primary_key=True),
    Column("home", Text, nullable=False),
    Column("epoch", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", TZ, nullable=False, server_default=NOW),
    postgresql_with={"fillfactor": DIRECTORY_FILLFACTOR},
)

# A catch-up position is (horizon, last_id): every change by a transaction older than
# `horizon` is applied, and of that transaction's own changes those up to `last_id`.
Table(
    "capture_pos",
    control,
    Column("shard_id", Text, _shard_fk(), primary_key=True),
    Column("direction", Text, primary_key=True),
    Column("last_id", BigInteger, nullable=False),
    Column("horizon", BigInteger, nullable=False, server_default=text("0")),
)

# Users of a rolled-back shard, held where they are until an operator releases them or
# moves them again in their own wave: no later plan takes them meanwhile.
Table(
    "held_users",
    control,
    Column("user_key", Text, primary_key=True),
    Column("shard_id", Text, _shard_fk(), nullable=False),
    Column("reason", Text, nullable=False),
    Column("at", TZ, nullable=False, server_default=NOW),
    Index("held_users_shard", "shard_id"),
)

Table(
    "audit",
    control,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("at", TZ, nullable=False, server_default=text("clock_timestamp()")),
    Column("run_id", Text, nullable=False),
    Column("shard_id", Text),
    Column("from_state", Text),
    Column("to_state", Text),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # the hash chain (revision control_0002): set when the row is sealed (`Control.seal`)
    Column("xid", XID8, nullable=False, server_default=text("pg_current_xact_id()")),
    Column("seq", BigInteger),
    Column("content", Text),
    Column("prev_sha256", Text),
    Column("sha256", Text),
    Index("audit_seq", "seq", unique=True),
    Index("audit_unsealed", "xid", "id", postgresql_where=text("seq IS NULL")),
)

Table(
    "object_manifest",
    control,
    Column("shard_id", Text, _shard_fk(), primary_key=True),
    Column("batch_no", Integer, nullable=False),
    Column("key", Text, primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("sha256", Text, nullable=False),
)

Table(
    "object_checkpoint",
    control,
    Column("shard_id", Text, _shard_fk(), primary_key=True),
    Column("batch_no", Integer, primary_key=True),
    Column("objects", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("digest", Text, nullable=False),
    Column("at", TZ, nullable=False, server_default=NOW),
)

capture = MetaData(schema=SCHEMA)

Table(
    "capture_users",
    capture,
    Column("user_key", Text, primary_key=True),
    Column("shard_id", Text, nullable=False),
)
Table(
    "fenced_users",
    capture,
    Column("user_key", Text, primary_key=True),
    Column("shard_id", Text, nullable=False),
    Index("fenced_users_shard", "shard_id"),
)
# One row per fenced shard: raising, holding (until = infinity) or lifting the fence is
# one write, however many users the shard has.
Table(
    "fences",
    capture,
    Column("shard_id", Text, primary_key=True),
    Column("until", TZ, nullable=False),
)
# Users a rollback took away from this region (revision capture_0003): the guard refuses
# their writes here until a cutover homes them here again.
Table(
    "departed",
    capture,
    Column("user_key", Text, primary_key=True),
    Column("shard_id", Text, nullable=False),
    Column("since", TZ, nullable=False, server_default=text("clock_timestamp()")),
    Index("departed_shard", "shard_id"),
)
# The change log, read in (xid, id) order below the oldest running transaction.
Table(
    "changes",
    capture,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("shard_id", Text, nullable=False),
    Column("tbl", Text, nullable=False),
    Column("pk", JSONB, nullable=False),
    Column("at", TZ, nullable=False, server_default=text("clock_timestamp()")),
    Column("xid", XID8, nullable=False, server_default=text("pg_current_xact_id()")),
    Index("changes_horizon", "shard_id", "xid", "id"),
)

# One row per purged batch at the source, committed with the batch's deletes (revision
# capture_0002); it stays when the capture tables are dropped.
Table(
    "purge_ledger",
    capture,
    Column("shard_id", Text, primary_key=True),
    Column("batch_no", Integer, primary_key=True),
    Column("receipt", JSONB, nullable=False),
    Column("at", TZ, nullable=False, server_default=text("clock_timestamp()")),
)

ledger = MetaData(schema=SCHEMA)

# The control database's audit chain head, as of each cutover, rollback and purge of a
# shard bound here (revision ledger_0002).
Table(
    "audit_heads",
    ledger,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("sha256", Text, nullable=False),
    Column("shard_id", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("at", TZ, nullable=False, server_default=NOW),
)

# What each batch wrote at the destination, committed with the batch's rows: a resumed
# copy believes the destination, not the control database.
Table(
    "batch_ledger",
    ledger,
    Column("shard_id", Text, primary_key=True),
    Column("batch_no", Integer, primary_key=True),
    Column("last_key", Text, nullable=False),
    Column("rows", JSONB, nullable=False),
    Column("digest", Text, nullable=False),
    Column("at", TZ, nullable=False, server_default=NOW),
)

# Signed manifests, one per cutover, rollback and purge of a shard bound here (ledger_0003).
Table(
    "manifests",
    ledger,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("shard_id", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("doc", Text, nullable=False),
    Column("signature", Text, nullable=False),
    Column("at", TZ, nullable=False, server_default=NOW),
    Index("manifests_shard", "shard_id", "id"),
)
