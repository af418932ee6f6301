"""Each shard's cutover task, with an optional approval before it: Airflow's
human-in-the-loop ApprovalOperator (standard provider), shown in the UI's Required Actions
with the shard's users, rows and digest from its last verify. Approve and the same task
cuts the shard over; reject and it rolls the shard back, the approver and their reason
recorded in the audit trail.

It asks only when the run's `approve_cutover` Param is on (default
$MIGRATOR_APPROVE_CUTOVER); otherwise it cuts over at once. The answer is recorded in the
control database before it is acted on, so a try that an outage failed after the answer
(the cutover retried, or a rejected shard's rollback) acts on it again without asking; a
new verify of the shard asks again.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Param

from migrator.airflow import tasks
from migrator.airflow.glue import classified, resolve_conn, resolve_s3, spec_path
from migrator.airflow.outage import Resumes
from migrator.errors import SpecError

DEFAULT_ENV = "MIGRATOR_APPROVE_CUTOVER"


def required_by_default() -> bool:
    return os.environ.get(DEFAULT_ENV, "").lower() in ("1", "true", "yes", "on")


class Cutover(Resumes, ApprovalOperator):
    """One per shard, in its region's group, after verify. The shard comes from the group's
    `<group>_shards` task (its map index), so nothing else is passed in. An outage waited
    out on the triggerer (`outage`) brings it back through `execute`: a recorded answer is
    acted on without asking again."""

    def __init__(self, *, group: str, **kwargs: Any) -> None:
        kwargs.pop("params", None)  # the DAG's own: the run's, not questions for the approver
        super().__init__(
            subject="Cut over a shard?",
            # optional (null allowed): a required field would keep the UI's Approve button
            # disabled until the approver typed a reason that only a rejection records
            params={
                "reason": Param(
                    None, type=["null", "string"], description="why; needed to reject (recorded with the rollback)"
                )
            },
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
        return tasks.load(spec_path(context["params"]), resolve_conn, resolve_s3=resolve_s3)

    def execute(self, context: Any) -> Any:
        desc = self._shard(context)
        run_id, sid = context["run_id"], desc["shard_id"]
        asked = context["params"].get("approve_cutover")
        spec = classified(self._spec)(context)
        if not (required_by_default() if asked is None else asked):
            return classified(tasks.phase)(spec, run_id, sid, "cutover")
        answer = classified(tasks.cutover_answer)(spec, run_id, sid)
        if answer is not None:
            self.log.info("shard %s: answered before this try (%s): not asking again", desc["name"], answer["event"])
            return classified(tasks.act_on_answer)(spec, run_id, sid, answer)
        self.subject = f"Cut over shard {desc['name']} to {desc['region']}?"
        self.body = classified(tasks.approval_summary)(spec, sid)
        self.log.info("shard %s: waiting for an approval in Required Actions", desc["name"])
        # raises to park the task until its answer: not an error, so not inside `classified`
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        desc = self._shard(context)
        # the answer, validated; not ApprovalOperator's own handling, which would skip the
        # tasks downstream of this one on a rejection (the run's report among them)
        ret = HITLOperator.execute_complete(self, context=context, event=event)
        approved = ret["chosen_options"][0] == self.APPROVE
        who = (ret.get("responded_by_user") or {}).get("name") or "an approver"
        reason = str((ret.get("params_input") or {}).get("reason") or "").strip()
        if not approved and len(reason) < 3:
            # a rejection rolls the shard back: it is not acted on without its reason
            self.log.error("shard %s: cutover rejected by %s without a reason: nothing was done", desc["name"], who)
            classified(_refuse)(desc["name"])  # fails the task, without a retry
        self.log.info(
            "shard %s: cutover %s by %s%s",
            desc["name"],
            "approved" if approved else "rejected",
            who,
            "" if approved else f": {reason}",
        )
        spec = classified(self._spec)(context)
        sid = desc["shard_id"]
        return classified(tasks.answer_cutover)(spec, context["run_id"], sid, approved, who, reason)


def _refuse(name: str) -> NoReturn:
    """Raised (and so failed without a retry): the answer is not recorded, the shard stays
    verified, and clearing the task asks again."""
    raise SpecError(
        f"shard {name}: a rejection needs a reason (at least three characters), recorded with the rollback; "
        "nothing was done: clear this task to be asked again"
    )


def approve_param() -> Param:
    return Param(
        None,
        type=["null", "boolean"],
        description=f"ask for an approval before each shard's cutover (Required Actions); empty: ${DEFAULT_ENV}",
    )
