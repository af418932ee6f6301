"""Manual rollback of named shards, with a reason recorded in the audit trail. A rolled-back
shard's users are held until released or moved again (the residency_release DAG)."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task


@dag(
    dag_id="residency_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    tags=["residency"],
    params={
        "shards": Param(
            type="array",
            items={"type": "string"},
            minItems=1,
            description="shard ids (wave/ie-03) or names (ie-03, with wave)",
        ),
        "wave": Param(None, type=["null", "string"], description="the wave, when shards are given by name"),
        "reason": Param(type="string", minLength=3, description="why; recorded in the audit table"),
        "dry_run": Param(False, type="boolean"),
        "spec": Param(None, type=["null", "string"], description="spec file; default $MIGRATOR_SPEC"),
    },
)
def residency_rollback():
    from migrator.airflow_glue import classified

    @task
    @classified
    def rollback_shards() -> list[dict]:
        from migrator import orchestration
        from migrator.airflow_glue import resolve_conn, resolve_s3, spec_path

        ctx = get_current_context()
        p = ctx["params"]
        spec = orchestration.load(spec_path(p), resolve_conn, resolve_s3=resolve_s3)
        ids = orchestration.shard_ids(spec, p["wave"], p["shards"])  # one wave per name, or refused
        if p["dry_run"]:
            return [orchestration.phase(spec, ctx["run_id"], s, "rollback", dry_run=True) for s in ids]
        return [orchestration.phase(spec, ctx["run_id"], s, "rollback", reason=p["reason"]) for s in ids]

    rollback_shards()


residency_rollback()
