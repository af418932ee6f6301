"""Retires the copy cut-over shards left at their origin (the source, or the home users left
when they moved again) past its retention (the spec's `purge` section): deletes or
pseudonymises their rows and deletes their objects there.

Scheduled daily; each run purges every shard that is due (or the shards named), one task
per shard. A shard whose destination no longer verifies, or whose key is missing, fails
its task with the reason and nothing of it purged; a transient outage is retried and a
cleared task resumes from the purge ledger. After a purge, rollback is refused.

Procedures: RUNBOOK.md in the project.
"""

from __future__ import annotations

import os

from airflow.sdk import Param, dag, get_current_context

from migrator.airflow import tasks
from migrator.airflow.glue import (
    classified,
    dry_run_param,
    from_param,
    regions_param,
    retries,
    shards_param,
    spec_param,
    start_date,
    task_spec,
)
from migrator.airflow.outage import store_task


@dag(
    dag_id="residency_purge",
    description="Retires the source copy of cut-over shards after their retention (rows deleted or pseudonymised).",
    schedule=os.environ.get("MIGRATOR_PURGE_SCHEDULE", "@daily"),
    start_date=start_date(),
    default_args=retries(),
    catchup=False,
    max_active_runs=1,
    tags=["residency"],
    doc_md=__doc__,
    params={
        "shards": shards_param("these due"),
        "wave": Param(None, type=["null", "string"], description="the wave, when a name is in several"),
        "region": regions_param(many=False),
        "from_region": from_param(),
        "dry_run": dry_run_param("say what would be purged; change nothing"),
        "spec": spec_param(),
    },
)
def residency_purge():
    @store_task
    @classified
    def select() -> list[str]:
        ctx = get_current_context()
        p = ctx["params"]
        return tasks.purge_select(task_spec(), ctx["run_id"], p["wave"], p["shards"], p["region"], p.get("from_region"))

    @store_task(map_index_template="{{ shard_name }}")
    @classified
    def purge_shard(shard_id: str) -> dict:
        ctx = get_current_context()
        ctx["shard_name"] = shard_id  # names the mapped instance in the UI
        return tasks.purge_one(task_spec(), ctx["run_id"], shard_id, bool(ctx["params"]["dry_run"]))

    @store_task(trigger_rule="all_done")
    @classified
    def report(ids: list[str]) -> dict:
        ctx = get_current_context()
        return tasks.purge_verdict(task_spec(), ids, bool(ctx["params"]["dry_run"]))

    ids = select()
    purge_shard.expand(shard_id=ids) >> report(ids)


residency_purge()
