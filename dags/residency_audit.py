"""Checks, reading only, what an independent monitor would: the audit trail's hash chain
against the heads kept in each destination region, and residency itself (no stray row at a
destination, every moved user's row at home, nothing of a purged user back at the source).

Hourly by default (`MIGRATOR_AUDIT_SCHEDULE`). A finding fails the run, named by kind,
region and table (never a row's content), so a failure callback or alert reaches a person;
green otherwise. Give it read-only Connections: it needs SELECT and nothing else.

Procedures: RUNBOOK.md in the project.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import dag, get_current_context

from migrator.airflow import tasks
from migrator.airflow.glue import classified, retries, spec_param, start_date, task_spec
from migrator.airflow.outage import store_task


@dag(
    dag_id="residency_audit",
    description="Checks the audit chain and residency from the stores alone; fails on any drift.",
    doc_md=__doc__,
    schedule=os.environ.get("MIGRATOR_AUDIT_SCHEDULE", "@hourly"),
    start_date=start_date(),
    default_args=retries(),
    catchup=False,
    max_active_runs=1,
    tags=["residency"],
    params={"spec": spec_param()},
)
def residency_audit():
    @store_task
    @classified
    def audit() -> dict:
        ctx = get_current_context()
        # incremental: shards active since the previous run's interval began (a manual run: all)
        prev = ctx.get("prev_data_interval_start_success")
        since = datetime.fromisoformat(str(prev)) if prev else None  # a pendulum time, or its text
        return tasks.audit_check(task_spec(), ctx["run_id"], since=since)

    audit()


residency_audit()
