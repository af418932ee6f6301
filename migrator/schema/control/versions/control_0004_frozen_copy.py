"""What a shard's source copy was when it cut over (`frozen`: its digest, and rows and
digest per table), read from the source right after the flip, while its fence keeps the
users' source rows still. The purge's recheck compares the copy with it, not with the
destination, which is the application's from the flip on. A shard cut over before this
revision has none; its purge reads the copy then, its fence held since the cutover.

Revision ID: control_0004
"""

from alembic import op

revision = "control_0004"
down_revision = "control_0003"
branch_labels = None
depends_on = None

S = "migrator"


def upgrade() -> None:
    op.execute(f"ALTER TABLE {S}.shard ADD COLUMN IF NOT EXISTS frozen jsonb")


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
