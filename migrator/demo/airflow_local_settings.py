"""Airflow's local settings for the migrator's DAGs: copied (demo, tests, bench) or mounted
(docker-compose.yml) as $AIRFLOW_HOME/config/airflow_local_settings.py, which Airflow
imports in each of its processes as it initialises.

The scheduler (LocalExecutor) and a Celery worker fork every task process from themselves,
so what they import here a task's start need not import again: the migrator's library, and
what parsing the DAG file imports of Airflow's (its decorators, the approval operator the
cutover task is built on), which the scheduler itself never needs. They keep the code they
started with: restart them after upgrading the migrator."""

import airflow.sdk.definitions.decorators  # noqa: F401

import migrator.airflow.approval  # noqa: F401
import migrator.airflow.glue  # noqa: F401
import migrator.airflow.tasks  # noqa: F401

__all__: list[str] = []  # no cluster policies or settings of Airflow's here
