"""Users who left this region: a rollback after cutover records each of its users here at
the destination, and the guard refuses their writes (RMF01, an INSERT included) until a
cutover homes them here again.

Revision ID: capture_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "capture_0003"
down_revision = "capture_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "departed",
        sa.Column("user_key", sa.Text, primary_key=True),
        sa.Column("shard_id", sa.Text, nullable=False),
        sa.Column("since", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("clock_timestamp()")),
        schema="migrator",
        if_not_exists=True,
    )
    op.create_index("departed_shard", "departed", ["shard_id"], schema="migrator", if_not_exists=True)


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
