"""Scheduled residency runs: each data interval's new users (or everyone, scope=all) are
planned into shards; each shard is copied, verified and cut over in a mapped task group,
rolled back if any of those fail; a final report fails the run if any shard did not
cut over.

Thin by design: every task calls `migrator.airflow.tasks`; nothing here opens a
connection when the file is parsed. DSNs come from Airflow Connections named in the spec
(`dsn: conn:migrator_us`), e.g. AIRFLOW_CONN_MIGRATOR_US.

Pool: copy tasks run in the `migrator_source` pool, whose size bounds how many shards
read from the US source at once (2 slots suit a 2-core source; one slot per spare core).

Params: `scope` (interval or all), `regions` and `shards` (empty: all), `wave` (run an
existing wave's shards instead of planning a new one), `batch_size`,
`dry_run` (log and return the plan only), `approve_cutover` (each shard's cutover task
waits for an approval in Required Actions first), `spec` (one of the configured specs).

What failing means: a red `copy`/`verify`/`cutover` after an outage leaves its shard
resumable (clear the failed tasks once the store is back); a shard in state `failed`
(a checksum mismatch, a conflict) is rolled back by its `rollback` task; the `report`
fails the run when any shard did not cut over and its log lists every shard's state.
Procedures: RUNBOOK.md in the project.
"""

from __future__ import annotations

import os

from airflow.sdk import CronDataIntervalTimetable, Param, TriggerRule, dag, get_current_context, task, task_group

from migrator.airflow import tasks
from migrator.airflow.approval import Cutover, approve_param
from migrator.airflow.glue import (
    classified,
    destination_regions,
    dry_run_param,
    regions_param,
    resolve_conn,
    resolve_s3,
    retries,
    shards_param,
    spec_param,
    spec_path,
    start_date,
)
from migrator.airflow.outage import store_task

# A cron with data intervals: each run covers [previous tick, this tick), so every user is
# in exactly one scheduled run's interval (a plain "@daily" gives zero-width intervals).
SCHEDULE = CronDataIntervalTimetable(os.environ.get("MIGRATOR_SCHEDULE", "0 0 * * *"), timezone="UTC")
POOL = os.environ.get("MIGRATOR_POOL", "migrator_source")


# Each destination region's shards get a task group and a Celery queue of that name; a
# deployment without a readable spec at parse time has a single "shard" group.
REGIONS = destination_regions()
GROUPS = REGIONS or ["shard"]


def _spec():
    params = get_current_context()["params"]
    return tasks.load(spec_path(params), resolve_conn, params.get("batch_size"), resolve_s3)


def _name_instance(desc: dict) -> None:
    get_current_context()["shard_name"] = desc["name"]


@dag(
    dag_id="residency_migration",
    description="Moves each interval's users to their residency region: plan, copy, verify, cut over, or roll back.",
    doc_md=__doc__,
    schedule=SCHEDULE,
    start_date=start_date(),
    catchup=False,
    max_active_runs=1,
    default_args=retries(),
    tags=["residency"],
    params={
        "scope": Param("interval", enum=["interval", "all"], description="users created in the data interval, or all"),
        "regions": regions_param(),
        "shards": shards_param("these"),
        "wave": Param(
            None,
            type=["null", "string"],
            description="run this existing wave's shards (e.g. one a retry planned again) instead of planning a new "
            "wave; its name (a run's note) or its run's id",
        ),
        "batch_size": Param(None, type=["null", "integer"], minimum=1, maximum=1000000, description="users per batch"),
        "dry_run": dry_run_param("plan only: log and return the plan's table, write nothing"),
        "approve_cutover": approve_param(),
        "spec": spec_param(),
    },
)
def residency_migration():
    @store_task
    @classified
    def plan() -> dict[str, list[dict]]:
        """The plan's table in the log; returns it (dry runs too) with each destination
        region's shards under its own key, for that region's group."""
        ctx = get_current_context()
        p = ctx["params"]
        start, end = ctx.get("data_interval_start"), ctx.get("data_interval_end")
        if p.get("wave"):  # an existing wave's shards, run again (a shard a retry planned again)
            wave = tasks.existing_wave(_spec(), p["wave"])
        else:
            wave = tasks.wave_for(p["scope"], start, end, ctx["run_id"])
        since, until = (None, None) if p["scope"] == "all" else (start, end)
        shards = tasks.plan(
            _spec(), ctx["run_id"], wave, since, until, p["regions"] or [], p["shards"] or [], bool(p["dry_run"])
        )
        return tasks.by_region(shards, GROUPS)

    @store_task(map_index_template="{{ shard_name }}", pool=POOL)
    @classified
    def copy(desc: dict) -> dict:
        _name_instance(desc)
        return tasks.phase(_spec(), get_current_context()["run_id"], desc["shard_id"], "copy")

    # A skipped copy (already copied) must not skip what follows: none_failed.
    @store_task(map_index_template="{{ shard_name }}", trigger_rule=TriggerRule.NONE_FAILED)
    @classified
    def verify(desc: dict) -> dict:
        _name_instance(desc)
        return tasks.phase(_spec(), get_current_context()["run_id"], desc["shard_id"], "verify")

    @store_task(map_index_template="{{ shard_name }}", trigger_rule=TriggerRule.ONE_FAILED)
    @classified
    def rollback(desc: dict) -> dict:
        _name_instance(desc)
        ctx = get_current_context()
        return tasks.rollback_if_terminal(
            _spec(), ctx["run_id"], desc["shard_id"], reason=f"automatic: a task of run {ctx['run_id']} failed for good"
        )

    def shard_group(region: str):
        """The shard tasks of one destination region, on its Celery queue (named as the region)."""
        q = {"queue": region} if region in REGIONS else {}

        @task_group(group_id=region)
        def shard(desc: dict):
            c = copy.override(**q)(desc)
            v = verify.override(**q)(desc)
            # asks for an approval first when the run says so (Required Actions), then cuts over
            k = Cutover(task_id="cutover", group=region, trigger_rule=TriggerRule.NONE_FAILED, **q)
            c >> v >> k
            rb = rollback.override(**q)(desc)
            [c, v, k] >> rb

        return shard

    @store_task(trigger_rule=TriggerRule.ALL_DONE)
    @classified
    def report(planned: dict[str, list[dict]]) -> dict:
        """Ends the run failed if any of its shards did not cut over: a rolled-back shard's
        group ends green (its rollback task succeeded), so the verdict comes from the
        shards' recorded states, not from the group's tasks."""
        shards = None if planned is None else planned["all"]
        return tasks.verdict(_spec(), None if shards is None else [s["shard_id"] for s in shards])

    @task
    def shards_of(planned: dict[str, list[dict]], group: str) -> list[dict]:
        """One group's shards from the plan (mapping cannot pick a key of a task's output)."""
        return planned[group]

    planned = plan()
    verdict = report(planned)
    for g in GROUPS:
        group = shard_group(g).expand(desc=shards_of.override(task_id=f"{g}_shards")(planned, g))
        # The report waits for each shard's cutover as well as its rollback (the group's only
        # leaf): "clear only failed tasks" clears a cutover that an outage left upstream-failed,
        # and the report it clears with it then waits for the resumed shard.
        group >> verdict
        group.children[f"{g}.cutover"] >> verdict


residency_migration()
