"""What a shard goes through: `plan` (with `residency`), `copy`, `verify`, `cutover`,
`rollback`, `purge`, `cleanup`. Each phase moves, checks or retires a shard's rows and
its objects together: the phase's module drives both, its `*_objects` module holds the
objects' half. A phase imports no other phase; what phases share lives in `migrator.shard`
(the one exception left: the purge's recheck runs `verify.verify_shard`)."""
