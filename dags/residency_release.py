"""Releases the held users of rolled-back shards (a later wave may then plan them), or
moves them again in their own wave; either way with a reason in the audit trail.

Procedures: RUNBOOK.md in the project.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from migrator.airflow.glue import classified, named_phase, named_shards_params


@dag(
    dag_id="residency_release",
    description="Releases the held users of rolled-back shards, or plans them again in their own wave.",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    tags=["residency"],
    params={
        **named_shards_params("rolled-back"),
        "mode": Param(
            "release",
            enum=["release", "retry"],
            description="release: free the users for a later wave; retry: plan them again in their own wave",
        ),
    },
)
def residency_release():
    @task
    @classified
    def release_shards() -> list[dict]:
        return named_phase("release")

    release_shards()


residency_release()
