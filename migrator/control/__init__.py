"""Below the phases: the control database (`store`: shards and their compare-and-set moves
with the audit rows; `membership`: their users, batches, checkpoints and holds), the
states a shard moves through (`state`), the ownership directory (`directory`), the held
users of rolled-back shards (`holds`), and the context every phase is given (`context`:
the spec, the control database, the run id and the tables as each side has them)."""
