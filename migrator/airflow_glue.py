"""The few things the DAG files need from Airflow's side: connections mapped onto the spec,
and the library's error classes turned into Airflow's (no retry for terminal errors)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from migrator.errors import describe, is_transient

SPEC_ENV = "MIGRATOR_SPEC"


def resolve_conn(conn_id: str) -> str:
    from airflow.sdk import BaseHook

    uri = BaseHook.get_connection(conn_id).get_uri()
    return uri.replace("postgres://", "postgresql://", 1)


def resolve_s3(conn_id: str) -> dict[str, str | None]:
    """An S3 endpoint from an Airflow (aws) Connection: login/password are the keys and the
    extra's endpoint_url the endpoint."""
    from airflow.sdk import BaseHook

    c = BaseHook.get_connection(conn_id)
    extra = c.extra_dejson or {}
    return {"endpoint": extra.get("endpoint_url"), "access_key": c.login, "secret_key": c.password}


def named_shards_params(what: str) -> dict[str, Any]:
    """The Params of a manual DAG that acts on shards an operator names, with a reason."""
    from airflow.sdk import Param

    return {
        "shards": Param(
            type="array",
            items={"type": "string"},
            minItems=1,
            description=f"{what} shard ids (wave/ie-03) or names (ie-03, unique or with wave)",
        ),
        "wave": Param(None, type=["null", "string"], description="the wave, when a name is in several"),
        "reason": Param(type="string", minLength=3, description="why; recorded in the audit table"),
        "spec": Param(None, type=["null", "string"], description="spec file; default $MIGRATOR_SPEC"),
    }


def named_phase(what: str) -> list[dict[str, Any]]:
    """Run the manual DAG's phase (`what`, or the `mode` Param) on the shards its Params name."""
    from airflow.sdk import get_current_context

    from migrator import orchestration

    ctx = get_current_context()
    p = ctx["params"]
    spec = orchestration.load(spec_path(p), resolve_conn, resolve_s3=resolve_s3)
    return orchestration.named_phase(
        spec, ctx["run_id"], p["wave"], p["shards"], p.get("mode", what), p["reason"], bool(p.get("dry_run"))
    )


def spec_path(params: dict[str, Any]) -> str:
    path = params.get("spec") or os.environ.get(SPEC_ENV)
    if not path:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"no spec: set the 'spec' param or the {SPEC_ENV} environment variable")
    return path


def classified(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Terminal errors fail the task without retries; transient ones are retried by Airflow.
    Only the error's class and the migrator's own message reach the log, never driver text."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        try:
            out = fn(*args, **kwargs)
        except AirflowSkipException:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise RuntimeError(f"transient: {describe(exc)}") from None
            raise AirflowFailException(describe(exc)) from None
        if isinstance(out, dict) and out.get("skipped"):
            # The phase's work was already done (or is not due): shown as skipped, not as work done.
            raise AirflowSkipException(f"shard {out.get('shard_id')}: {out['skipped']}")
        return out

    return wrapper


def task_spec():
    """The spec of the running DAG task (its `spec` Param or $MIGRATOR_SPEC), connections resolved."""
    from airflow.sdk import get_current_context

    from migrator import orchestration

    return orchestration.load(spec_path(get_current_context()["params"]), resolve_conn, resolve_s3=resolve_s3)
