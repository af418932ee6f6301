"""Signed manifests: one per cutover, rollback and purge of a shard bound here, each a
canonical JSON document and its Ed25519 signature (`migrator.evidence`).

Revision ID: ledger_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "ledger_0003"
down_revision = "ledger_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "manifests",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("shard_id", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")),
        schema="migrator",
        if_not_exists=True,
    )
    op.create_index("manifests_shard", "manifests", ["shard_id", "id"], schema="migrator", if_not_exists=True)


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
