"""Above the phases: the one dispatcher that says whether a phase runs for a shard
(`dispatch`), the engine that runs shards through their phases (`engine`), and the
document every face prints (`report`)."""
