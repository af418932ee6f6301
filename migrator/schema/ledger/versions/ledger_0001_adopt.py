"""Adopt the destination's batch ledger as the tool wrote it before it kept a schema history.

Revision ID: ledger_0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "ledger_0001"
down_revision = None
branch_labels = None
depends_on = None

S = "migrator"


def upgrade() -> None:
    op.create_table(
        "batch_ledger",
        sa.Column("shard_id", sa.Text, primary_key=True),
        sa.Column("batch_no", sa.Integer, primary_key=True),
        sa.Column("last_key", sa.Text, nullable=False),
        sa.Column("rows", JSONB, nullable=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")),
        schema=S,
        if_not_exists=True,
    )


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
