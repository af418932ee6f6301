"""Adopt the capture tables as the tool wrote them before it kept a schema history.

Creates what is missing and converts what earlier versions left, idempotently, so a
source (or destination) in the middle of a migration is brought up to date in place:
* a fence list whose users each carried their own `until`: those fences (a cut-over
  shard's, held for good) become rows of migrator.fences, so none is dropped;
* a change log without transaction ids: its changes count as written by the oldest
  transaction, so the next catch-up applies them (once more, harmlessly).

Revision ID: capture_0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from migrator.schema.tables import XID8

revision = "capture_0001"
down_revision = None
branch_labels = None
depends_on = None

S = "migrator"
TZ = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "capture_users",
        sa.Column("user_key", sa.Text, primary_key=True),
        sa.Column("shard_id", sa.Text, nullable=False),
        schema=S,
        if_not_exists=True,
    )
    op.create_table(
        "fenced_users",
        sa.Column("user_key", sa.Text, primary_key=True),
        sa.Column("shard_id", sa.Text, nullable=False),
        schema=S,
        if_not_exists=True,
    )
    op.create_index("fenced_users_shard", "fenced_users", ["shard_id"], schema=S, if_not_exists=True)
    op.create_table(
        "fences",
        sa.Column("shard_id", sa.Text, primary_key=True),
        sa.Column("until", TZ, nullable=False),
        schema=S,
        if_not_exists=True,
    )
    op.execute(f"""
DO $adopt$ BEGIN
  IF EXISTS (SELECT 1 FROM information_schema.columns
             WHERE table_schema = '{S}' AND table_name = 'fenced_users' AND column_name = 'until') THEN
    INSERT INTO {S}.fences (shard_id, until)
      SELECT shard_id, max(until) FROM {S}.fenced_users GROUP BY shard_id ON CONFLICT (shard_id) DO NOTHING;
    ALTER TABLE {S}.fenced_users DROP COLUMN until;
  END IF;
END $adopt$""")
    op.create_table(
        "changes",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("shard_id", sa.Text, nullable=False),
        sa.Column("tbl", sa.Text, nullable=False),
        sa.Column("pk", JSONB, nullable=False),
        sa.Column("at", TZ, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("xid", XID8(), nullable=False, server_default=sa.text("pg_current_xact_id()")),
        schema=S,
        if_not_exists=True,
    )
    # The index is created only if missing: even CREATE INDEX IF NOT EXISTS waits for the
    # locks of writers whose triggers are appending to the log.
    op.execute(f"""
DO $adopt$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{S}' AND table_name = 'changes' AND column_name = 'xid') THEN
    ALTER TABLE {S}.changes ADD COLUMN xid xid8 NOT NULL DEFAULT '1';
    ALTER TABLE {S}.changes ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
  END IF;
  IF to_regclass('{S}.changes_shard') IS NOT NULL THEN
    DROP INDEX {S}.changes_shard;
  END IF;
  IF to_regclass('{S}.changes_horizon') IS NULL THEN
    CREATE INDEX changes_horizon ON {S}.changes (shard_id, xid, id);
  END IF;
END $adopt$""")


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
