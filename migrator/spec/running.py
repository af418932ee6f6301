"""The spec's settings of how the phases run: shards per region, the copy's batches and
lanes, the throttle, the verify's workers and memory, retries. What data moves, and how it
is retired, is in `sections`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from migrator.spec.fields import Strict
from migrator.spec.sections import Store


class Sharding(Strict):
    shards_per_region: int = Field(4, ge=1, le=4096)


class ThrottleSettings(Strict):
    """When the phases that read a shard at the source (the copy, and the verify's reads
    there) hold back for the source's own work: before each step (a batch, a table) they
    wait while any limit is exceeded, and keep the shard's rate under a ceiling."""

    max_active: int | None = Field(
        None, ge=1, description="other backends running a query at the source above which the copy waits"
    )
    max_lock_waits: int | None = Field(
        None, ge=0, description="backends waiting for a lock at the source above which the copy waits"
    )
    max_rows_per_s: int | None = Field(
        None, ge=1, description="rows per second one shard's copy may move (or its verify read at the source) at most"
    )
    standby: Store | None = Field(
        None, description="a streaming standby of the source whose replay lag the copy watches (max_replay_lag_s)"
    )
    max_replay_lag_s: float | None = Field(
        None, gt=0, description="seconds the standby's replay may lag behind the source before the copy waits"
    )
    check_every_s: float = Field(1.0, gt=0, le=60, description="how often a waiting copy or verify looks again")

    @model_validator(mode="after")
    def _standby_and_lag(self) -> ThrottleSettings:
        if (self.standby is None) != (self.max_replay_lag_s is None):
            raise ValueError("standby and max_replay_lag_s go together: give both or neither")
        return self


class CopySettings(Strict):
    batch_users: int = Field(500, ge=1, le=1_000_000)
    protocol: Literal["auto", "tables", "stream"] = Field(
        "auto",
        description="how a batch's rows travel to the destination: `tables`, a binary COPY per table (two "
        "round trips each, the least CPU); `stream`, every table's rows in one COPY, inserted from a staging "
        "table in one message (four round trips a batch, about twice the destination's CPU); `auto`, "
        "`stream` when the destination's round trip is at least 10 ms (migrator/phases/copy_stream.py)",
    )
    throttle: ThrottleSettings = Field(ThrottleSettings(), description="holding back while the source is busy")
    workers: int = Field(
        2,
        ge=1,
        le=32,
        description="batches of one shard copied at once, each on its own source and destination connection",
    )
    inline_digest: bool = Field(
        False,
        description="also compare each batch's row digests on both sides before it commits; the verify "
        "phase compares every row before cutover either way, so this only finds a difference earlier; "
        "batches then run one at a time",
    )
    skip_edge_checks: bool = Field(
        True,
        description="write a batch's rows of a table whose only triggers are the graph's own foreign-key "
        "checks (and the migrator's guard) with its triggers skipped, as logical replication does: those "
        "checks cannot fail for a whole batch (migrator/replica.py), and they are most of a copy's and a "
        "rollback's or purge's delete's cost; needs a superuser or SET on session_replication_role, else "
        "every row is checked; false checks every row",
    )

    @property
    def lanes(self) -> int:
        """How many of a shard's batches its phases work on at once."""
        return 1 if self.inline_digest else self.workers


class VerifySettings(Strict):
    workers: int = Field(2, ge=1, le=16, description="connections per side, each digesting a share of the tables")
    max_hash_mb: int = Field(
        1024,
        ge=128,
        le=65536,
        description="memory (PostgreSQL work_mem) one verify connection may give the hash join of a table with "
        "the shard's users or parent rows; sized to the shard's rows up to this, so the join takes one pass; "
        "a shard too large for it is still compared exactly, in two passes",
    )


class RetrySettings(Strict):
    attempts: int = Field(5, ge=1, le=50)
    initial_wait_s: float = Field(0.5, ge=0)
    max_wait_s: float = Field(8.0, ge=0)
    outage_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="how long a call to the control database is retried through a transient outage "
        "(a restart, a failover) before the step fails, resumable",
    )
    outage_budget_s: float = Field(
        3600.0, ge=0, le=7 * 86400, description="how long an Airflow task waits deferred for a store it cannot reach"
    )
    outage_poll_s: float = Field(5.0, gt=0, le=600, description="how often a waiting task's stores are tried")
