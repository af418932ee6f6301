"""An approval before each shard's cutover: Airflow's human-in-the-loop ApprovalOperator
(standard provider), shown in the UI's Required Actions with the shard's users, rows and
digest from its last verify. Approve and the cutover runs; reject and the shard is rolled
back, the approver and their reason recorded in the audit trail.

Optional: it asks only when the run's `approve_cutover` Param is on (default
$MIGRATOR_APPROVE_CUTOVER); otherwise it approves at once and says so.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param

DEFAULT_ENV = "MIGRATOR_APPROVE_CUTOVER"


def required_by_default() -> bool:
    return os.environ.get(DEFAULT_ENV, "").lower() in ("1", "true", "yes", "on")


class CutoverApproval(ApprovalOperator):
    """One per shard, in its region's group, between verify and cutover. The shard comes
    from the group's `<group>_shards` task (its map index), so nothing else is passed in."""

    def __init__(self, *, group: str, **kwargs: Any) -> None:
        kwargs.pop("params", None)  # the DAG's own: the run's, not questions for the approver
        super().__init__(
            subject="Cut over a shard?",
            # optional (null allowed): a required field would keep the UI's Approve button
            # disabled until the approver typed a reason that only a rejection records
            params={"reason": Param(None, type=["null", "string"], description="why (recorded when you reject)")},
            map_index_template="{{ shard_name }}",
            **kwargs,
        )
        self.group = group

    def _shard(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        desc = ti.xcom_pull(task_ids=f"{self.group}_shards")[ti.map_index]
        context["shard_name"] = desc["name"]
        return desc

    def _spec(self, context: Any):
        from migrator import orchestration
        from migrator.airflow_glue import resolve_conn, resolve_s3, spec_path

        return orchestration.load(spec_path(context["params"]), resolve_conn, resolve_s3=resolve_s3)

    def execute(self, context: Any) -> Any:
        desc = self._shard(context)
        asked = context["params"].get("approve_cutover")
        if not (required_by_default() if asked is None else asked):
            self.log.info("shard %s: no approval asked for (approve_cutover is off): approved", desc["name"])
            return {"chosen_options": [self.APPROVE], "params_input": {}, "asked": False}
        from migrator import orchestration  # only when asking: a task's start pays for this import

        if context["ti"].try_number > 1:
            # Airflow retried this task (e.g. the executor's report of the pause came after the
            # answer resumed it). Its earlier try's answer is in that try's history, which a
            # task cannot read, so the approver is asked again; nothing was cut over meanwhile.
            self.log.warning("shard %s: try %s of its approval: asking again", desc["name"], context["ti"].try_number)
        self.subject = f"Cut over shard {desc['name']} to {desc['region']}?"
        self.body = orchestration.approval_summary(self._spec(context), desc["shard_id"])
        self.log.info("shard %s: waiting for an approval in Required Actions", desc["name"])
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from migrator import orchestration

        desc = self._shard(context)
        ret = super().execute_complete(context=context, event=event)
        if ret["chosen_options"][0] == self.REJECT:
            who = _approver(ret)
            reason = str((ret.get("params_input") or {}).get("reason") or "")
            self.log.info("shard %s: cutover rejected; rolling it back", desc["name"])
            orchestration.reject_cutover(self._spec(context), context["run_id"], desc["shard_id"], who, reason)
        return ret


def rejection(ti: Any) -> str | None:
    """Why the approval before this cutover task (same group, same map index) rejected it,
    or None when it approved or asked nothing."""
    group = ti.task_id.rpartition(".")[0]
    answer = ti.xcom_pull(task_ids=f"{group}.approve" if group else "approve", map_indexes=ti.map_index)
    if not isinstance(answer, dict) or (answer.get("chosen_options") or [None])[0] != CutoverApproval.REJECT:
        return None
    return f"cutover rejected by {_approver(answer)}; the shard was rolled back"


def _approver(answer: dict[str, Any]) -> str:
    return (answer.get("responded_by_user") or {}).get("name") or "an approver"


def approve_param() -> Param:
    return Param(
        None,
        type=["null", "boolean"],
        description=f"ask for an approval before each shard's cutover (Required Actions); empty: ${DEFAULT_ENV}",
    )
