"""Adopt the control tables as the tool wrote them before it kept a schema history.

Creates what is missing and converts what earlier versions left: a directory without its
fillfactor, catch-up positions without a horizon. Idempotent, so a control database in
the middle of a migration is brought up to date in place.

Revision ID: control_0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "control_0001"
down_revision = None
branch_labels = None
depends_on = None

S = "migrator"
TZ = sa.TIMESTAMP(timezone=True)
NOW = sa.text("now()")


def _shard_fk() -> sa.ForeignKey:
    return sa.ForeignKey(f"{S}.shard.shard_id", ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        schema=S,
        if_not_exists=True,
    )
    op.create_table(
        "shard",
        sa.Column("shard_id", sa.Text, primary_key=True),
        sa.Column("wave", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("region", sa.Text, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("users", sa.Integer, nullable=False),
        sa.Column("batches", sa.Integer, nullable=False),
        sa.Column("plan", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("digest", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.Column("updated_at", TZ, nullable=False, server_default=NOW),
        schema=S,
        if_not_exists=True,
    )
    op.create_table(
        "shard_user",
        sa.Column("shard_id", sa.Text, _shard_fk(), primary_key=True),
        sa.Column("user_key", sa.Text, primary_key=True),
        sa.Column("batch_no", sa.Integer, nullable=False),
        schema=S,
        if_not_exists=True,
    )
    op.create_index("shard_user_key", "shard_user", ["user_key"], schema=S, if_not_exists=True)
    op.create_index("shard_user_batch", "shard_user", ["shard_id", "batch_no"], schema=S, if_not_exists=True)
    op.create_table(
        "checkpoint",
        sa.Column("shard_id", sa.Text, _shard_fk(), primary_key=True),
        sa.Column("batch_no", sa.Integer, primary_key=True),
        sa.Column("last_key", sa.Text, nullable=False),
        sa.Column("rows", JSONB, nullable=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("at", TZ, nullable=False, server_default=NOW),
        schema=S,
        if_not_exists=True,
    )
    op.create_table(
        "directory",
        sa.Column("user_key", sa.Text, primary_key=True),
        sa.Column("home", sa.Text, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("updated_at", TZ, nullable=False, server_default=NOW),
        schema=S,
        if_not_exists=True,
        postgresql_with={"fillfactor": 45},
    )
    # a directory created before it had a fillfactor: pages written from now on keep room
    op.execute(f"ALTER TABLE {S}.directory SET (fillfactor = 45)")
    op.create_table(
        "capture_pos",
        sa.Column("shard_id", sa.Text, _shard_fk(), primary_key=True),
        sa.Column("direction", sa.Text, primary_key=True),
        sa.Column("last_id", sa.BigInteger, nullable=False),
        sa.Column("horizon", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        schema=S,
        if_not_exists=True,
    )
    # A position saved before the horizon existed reads as horizon 0: its changes are
    # applied once more, which is harmless.
    op.execute(f"ALTER TABLE {S}.capture_pos ADD COLUMN IF NOT EXISTS horizon bigint NOT NULL DEFAULT 0")
    op.create_table(
        "held_users",
        sa.Column("user_key", sa.Text, primary_key=True),
        sa.Column("shard_id", sa.Text, _shard_fk(), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", TZ, nullable=False, server_default=NOW),
        schema=S,
        if_not_exists=True,
    )
    op.create_index("held_users_shard", "held_users", ["shard_id"], schema=S, if_not_exists=True)
    op.create_table(
        "audit",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("at", TZ, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("shard_id", sa.Text),
        sa.Column("from_state", sa.Text),
        sa.Column("to_state", sa.Text),
        sa.Column("detail", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        schema=S,
        if_not_exists=True,
    )
    op.create_table(
        "object_manifest",
        sa.Column("shard_id", sa.Text, _shard_fk(), primary_key=True),
        sa.Column("batch_no", sa.Integer, nullable=False),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        schema=S,
        if_not_exists=True,
    )
    op.create_table(
        "object_checkpoint",
        sa.Column("shard_id", sa.Text, _shard_fk(), primary_key=True),
        sa.Column("batch_no", sa.Integer, primary_key=True),
        sa.Column("objects", sa.Integer, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("at", TZ, nullable=False, server_default=NOW),
        schema=S,
        if_not_exists=True,
    )
    # The state version the tool checked before it kept a history; the revision says it now.
    op.execute(f"DELETE FROM {S}.meta WHERE key = 'state_version'")


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
