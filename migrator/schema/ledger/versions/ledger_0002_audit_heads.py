"""The head of the control database's audit chain, written into each destination region at
every cutover, rollback and purge that concerns it: the US side alone cannot then rewrite
history unnoticed (`migrator audit` compares the chain with every head).

Revision ID: ledger_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "ledger_0002"
down_revision = "ledger_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_heads",
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("shard_id", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")),
        schema="migrator",
        if_not_exists=True,
    )


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
