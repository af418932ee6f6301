"""Where a shard's users move from (`origin`): the region that is their home until the
shard cuts over, and again after its rollback. A shard planned before this revision moved
users out of the spec's source region, which is what an empty origin means.

Revision ID: control_0005
"""

from alembic import op

revision = "control_0005"
down_revision = "control_0004"
branch_labels = None
depends_on = None

S = "migrator"


def upgrade() -> None:
    op.execute(f"ALTER TABLE {S}.shard ADD COLUMN IF NOT EXISTS origin text")


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
