"""The audit trail as a hash chain: each sealed row carries its place in the chain (`seq`),
the canonical text it was sealed with (`content`), the SHA-256 of the previous row and its
own. Rows are sealed after they commit, in the order of their writers' transactions
(`xid`), by `Control.seal`; rows written before this revision are sealed first, in id
order, the first time the tool runs after the upgrade.

Revision ID: control_0002
"""

from alembic import op

revision = "control_0002"
down_revision = "control_0001"
branch_labels = None
depends_on = None

S = "migrator"


def upgrade() -> None:
    op.execute(f"""
DO $chain$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{S}' AND table_name = 'audit' AND column_name = 'xid') THEN
    ALTER TABLE {S}.audit ADD COLUMN xid xid8 NOT NULL DEFAULT '1';  -- earlier rows: sealed first
    ALTER TABLE {S}.audit ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
  END IF;
END $chain$""")
    op.execute(f"ALTER TABLE {S}.audit ADD COLUMN IF NOT EXISTS seq bigint")
    op.execute(f"ALTER TABLE {S}.audit ADD COLUMN IF NOT EXISTS content text")
    op.execute(f"ALTER TABLE {S}.audit ADD COLUMN IF NOT EXISTS prev_sha256 text")
    op.execute(f"ALTER TABLE {S}.audit ADD COLUMN IF NOT EXISTS sha256 text")
    op.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS audit_seq ON {S}.audit (seq)")
    op.execute(f"CREATE INDEX IF NOT EXISTS audit_unsealed ON {S}.audit (xid, id) WHERE seq IS NULL")


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
