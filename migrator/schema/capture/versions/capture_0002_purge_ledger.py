"""The source's purge ledger: one row per purged batch, committed with the batch's deletes
and pseudonyms, so a resumed purge starts at the next batch and never touches a batch twice.

Revision ID: capture_0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "capture_0002"
down_revision = "capture_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "purge_ledger",
        sa.Column("shard_id", sa.Text, primary_key=True),
        sa.Column("batch_no", sa.Integer, primary_key=True),
        sa.Column("receipt", JSONB, nullable=False),
        sa.Column("at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("clock_timestamp()")),
        schema="migrator",
        if_not_exists=True,  # it outlives the capture tables, which are dropped when unused
    )


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
