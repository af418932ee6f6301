"""Releases the held users of rolled-back shards (a later wave may then plan them), or
moves them again in their own wave; either way with a reason in the audit trail."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task


@dag(
    dag_id="residency_release",
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    tags=["residency"],
    params={
        "shards": Param(
            type="array",
            items={"type": "string"},
            minItems=1,
            description="rolled-back shard ids (wave/ie-03) or names (ie-03, unique or with wave)",
        ),
        "wave": Param(None, type=["null", "string"], description="the wave, when a name is in several"),
        "reason": Param(type="string", minLength=3, description="why; recorded in the audit table"),
        "mode": Param(
            "release",
            enum=["release", "retry"],
            description="release: free the users for a later wave; retry: plan them again in their own wave",
        ),
        "spec": Param(None, type=["null", "string"], description="spec file; default $MIGRATOR_SPEC"),
    },
)
def residency_release():
    from migrator.airflow_glue import classified

    @task
    @classified
    def release_shards() -> list[dict]:
        from migrator import orchestration
        from migrator.airflow_glue import resolve_conn, resolve_s3, spec_path

        ctx = get_current_context()
        p = ctx["params"]
        spec = orchestration.load(spec_path(p), resolve_conn, resolve_s3=resolve_s3)
        ids = orchestration.shard_ids(spec, p["wave"], p["shards"])
        return [orchestration.phase(spec, ctx["run_id"], s, p["mode"], reason=p["reason"]) for s in ids]

    release_shards()


residency_release()
