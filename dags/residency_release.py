"""Releases the held users of rolled-back shards (a later wave may then plan them), or
moves them again: `retry` plans them again in their own wave and starts a
`residency_migration` run of exactly those shards (copy, verify, cutover); either way
with a reason in the audit trail.

Procedures: RUNBOOK.md in the project.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context
from airflow.sdk.exceptions import AirflowSkipException

from migrator.airflow.glue import classified, named_phase, named_shards_params, retries
from migrator.airflow.outage import store_task
from migrator.airflow.tasks import migration_conf


@dag(
    dag_id="residency_release",
    description="Releases the held users of rolled-back shards, or moves them again in their own wave.",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    default_args=retries(),
    tags=["residency"],
    params={
        **named_shards_params("rolled-back"),
        "mode": Param(
            "release",
            enum=["release", "retry"],
            description="release: free the users for a later wave; retry: plan them again in their own wave "
            "and run them (a residency_migration run of those shards)",
        ),
    },
)
def residency_release():
    @store_task
    @classified
    def release_shards() -> list[dict]:
        return named_phase("release")

    @store_task
    def rerun(done: list[dict]) -> dict:
        """In retry mode, the migration run's conf for the shards planned again (else skipped)."""
        conf = migration_conf(get_current_context()["params"], done)
        if conf is None:
            raise AirflowSkipException("release mode: nothing to run")
        return conf

    conf = rerun(release_shards())
    TriggerDagRunOperator(task_id="run_them", trigger_dag_id="residency_migration", conf=conf)


residency_release()
