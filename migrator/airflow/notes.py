"""The wave a migration run works on, shown on the run's page: when a run of the migration
DAG starts, the scheduler (through this plugin's listener) writes its wave's short name
into the run's note, unless someone wrote a note already. The rollback and release forms
take that name (or the run's id) in their `wave` field."""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

from migrator.airflow import tasks

log = logging.getLogger("migrator.airflow.notes")

MIGRATION_DAG = "residency_migration"


def note_for(dag_run: Any) -> str | None:
    """The note of a migration run: its wave's name, as its plan task names it."""
    if dag_run.dag_id != MIGRATION_DAG:
        return None
    conf = dag_run.conf or {}
    if conf.get("wave"):  # a run of an existing wave
        return f"wave {conf['wave']}"
    scope = conf.get("scope") or "interval"
    wave = tasks.wave_for(scope, dag_run.data_interval_start, dag_run.data_interval_end, dag_run.run_id)
    return f"wave {wave}"


@hookimpl
def on_dag_run_running(dag_run: Any, msg: str) -> None:
    try:
        note = note_for(dag_run)
        if note and not dag_run.note:
            dag_run.note = note  # committed with the scheduler's own change of the run's state
    except Exception as exc:  # a note is a courtesy: never in the way of the run
        log.warning("the run's wave note was not written: %s", type(exc).__name__)
