"""What a shard's state machine keeps beside its state, which earlier versions read back
from the audit rows: when it entered its state (`state_since`: the purge's retention runs
from its cutover), whether its capture was finalized by cleanup (`finalized_at`: no
rollback after it), the reason of the rollback asked for (`rollback_reason`: what recovery
completes a rollback with), its last verify (`last_verify`: what an approver is shown) and
the approver's answer to its cutover since then (`approval`). A shard planned before this
revision gets each from its audit rows, so an upgrade mid-migration changes no answer.

Revision ID: control_0003
"""

from alembic import op

revision = "control_0003"
down_revision = "control_0002"
branch_labels = None
depends_on = None

S = "migrator"


def upgrade() -> None:
    op.execute(f"""
DO $state$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{S}' AND table_name = 'shard' AND column_name = 'state_since') THEN
    ALTER TABLE {S}.shard ADD COLUMN state_since timestamptz,
                          ADD COLUMN finalized_at timestamptz,
                          ADD COLUMN rollback_reason text,
                          ADD COLUMN last_verify jsonb,
                          ADD COLUMN approval jsonb;
    UPDATE {S}.shard s SET
      state_since = coalesce((SELECT max(a.at) FROM {S}.audit a WHERE a.shard_id = s.shard_id
                              AND a.to_state = s.state AND a.from_state IS DISTINCT FROM a.to_state),
                             s.updated_at),
      finalized_at = (SELECT max(a.at) FROM {S}.audit a WHERE a.shard_id = s.shard_id
                      AND a.detail->>'event' = 'finalized'),
      rollback_reason = (SELECT a.detail->>'reason' FROM {S}.audit a WHERE a.shard_id = s.shard_id
                         AND a.detail->>'event' = 'rollback requested' ORDER BY a.id DESC LIMIT 1),
      last_verify = (SELECT a.detail - 'event' FROM {S}.audit a WHERE a.shard_id = s.shard_id
                     AND a.detail->>'event' = 'verify' ORDER BY a.id DESC LIMIT 1),
      approval = (SELECT a.detail || jsonb_build_object('run_id', a.run_id) FROM {S}.audit a
                  WHERE a.shard_id = s.shard_id
                    AND a.detail->>'event' IN ('cutover approved', 'cutover rejected')
                    AND a.id > coalesce((SELECT max(v.id) FROM {S}.audit v WHERE v.shard_id = s.shard_id
                                         AND v.detail->>'event' = 'verify'), 0)
                  ORDER BY a.id DESC LIMIT 1);
    ALTER TABLE {S}.shard ALTER COLUMN state_since SET DEFAULT clock_timestamp(),
                          ALTER COLUMN state_since SET NOT NULL;
  END IF;
END $state$""")


def downgrade() -> None:
    raise NotImplementedError("the migrator's tables are not downgraded")
