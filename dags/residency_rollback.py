"""Manual rollback of named shards, with a reason recorded in the audit trail. A rolled-back
shard's users are held until released or moved again (the residency_release DAG).

Procedures: RUNBOOK.md in the project.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from migrator.airflow.glue import classified, dry_run_param, named_phase, named_shards_params, retries
from migrator.airflow.outage import store_task


@dag(
    dag_id="residency_rollback",
    description="Rolls back the shards an operator names, with a reason; their users are then held.",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    default_args=retries(),
    tags=["residency"],
    params={**named_shards_params("the"), "dry_run": dry_run_param("say what would be rolled back; change nothing")},
)
def residency_rollback():
    @store_task
    @classified
    def rollback_shards() -> list[dict]:
        return named_phase("rollback")

    rollback_shards()


residency_rollback()
