"""The few things the DAG files need from Airflow's side: connections mapped onto the spec,
and the library's error classes turned into Airflow's (no retry for terminal errors)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from migrator.airflow import tasks
from migrator.errors import describe
from migrator.spec import read_yaml
from migrator.stores import retry_later

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


START_ENV = "MIGRATOR_START_DATE"


def start_date() -> Any:
    """When the scheduled DAGs' first interval starts: $MIGRATOR_START_DATE (ISO 8601), or
    2026-11-01. The `--ui` demo sets its own start, so no scheduled run comes before an
    operator acts; backfills of earlier days still run."""
    import pendulum

    raw = os.environ.get(START_ENV)
    return pendulum.parse(raw) if raw else pendulum.datetime(2026, 11, 1, tz="UTC")


def retries() -> dict[str, Any]:
    """Airflow's retries of a task whose process died or whose own API call failed
    (`MIGRATOR_TASK_RETRIES`, 3; `MIGRATOR_TASK_RETRY_DELAY_S`, 10, growing); a store's
    outage is waited out without them (`outage`), a terminal error is never retried."""
    import pendulum

    return dict(
        retries=int(os.environ.get("MIGRATOR_TASK_RETRIES", "3")),
        retry_delay=pendulum.duration(seconds=float(os.environ.get("MIGRATOR_TASK_RETRY_DELAY_S", "10"))),
        retry_exponential_backoff=True,
    )


SPECS_ENV = "MIGRATOR_SPECS"  # the specs a run may choose: "name=path;name=path"
REGION = "^[a-z][a-z0-9_]*$"
SHARD = "^([^/]+/)?([a-z][a-z0-9_]*-)?[a-z][a-z0-9_]*-[0-9]+$"  # ie-03, ie-no-01 (a move again), or wave/ie-03


def configured_specs() -> dict[str, str]:
    """The specs an operator may choose by name in a run's form ($MIGRATOR_SPECS); the
    default ($MIGRATOR_SPEC) is always there as "default". No run can name a free path."""
    out = {}
    if os.environ.get(SPEC_ENV):
        out["default"] = os.environ[SPEC_ENV]
    for item in os.environ.get(SPECS_ENV, "").split(";"):
        name, _, path = item.partition("=")
        if name.strip() and path.strip():
            out[name.strip()] = path.strip()
    return out


def destination_regions() -> list[str]:
    """The destination regions of the default spec, read (YAML only, no connection) when
    the DAG file is parsed: each gets its shard group and Celery queue."""
    path = os.environ.get(SPEC_ENV)
    if not path or not os.path.exists(path):
        return []
    return list(_regions_of(path, os.stat(path).st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _regions_of(path: str, _mtime_ns: int) -> tuple[str, ...]:
    """Read once per version of the file: a DAG file asks several times as it is parsed,
    and every task process parses its DAG file."""
    data = read_yaml(path) or {}
    source = data.get("source_region", "us")
    return tuple(sorted({r for r in (data.get("policy") or {}).values() if r != source}))


def spec_param():
    from airflow.sdk import Param

    names = sorted(configured_specs())
    return Param(
        None,
        type=["null", "string"],
        enum=[None, *names],
        description=f"one of the configured specs ({SPECS_ENV}); empty: the default ($MIGRATOR_SPEC)",
    )


def shards_param(what: str, required: bool = False):
    from airflow.sdk import Param

    if required:
        return Param(
            type="array",
            items={"type": "string", "pattern": SHARD},
            minItems=1,
            description=f"{what} shard ids (wave/ie-03) or names (ie-03, unique or with wave)",
        )
    return Param(
        None,
        type=["null", "array"],
        items={"type": "string", "pattern": SHARD},
        description=f"{what} shard names (ie-03) or ids (wave/ie-03); empty: all",
    )


def regions_param(many: bool = True):
    from airflow.sdk import Param

    regions = destination_regions()
    item: dict[str, Any] = {"type": "string", "pattern": REGION, **({"enum": regions} if regions else {})}
    if many:  # with examples, the form offers the regions as a multi-select
        schema: dict[str, Any] = {"type": ["null", "array"], "items": item}
        if regions:
            schema["examples"] = regions
        return Param(None, description="destination regions; empty: all", **schema)
    return Param(
        None,
        type=["null", "string"],
        **({"enum": [None, *regions]} if regions else {"pattern": REGION}),
        description="only shards bound for this region; empty: all",
    )


def from_param():
    """The region the shards' users move from (the source, or a home they leave when they
    move again): every region of the default spec."""
    from airflow.sdk import Param

    path = os.environ.get(SPEC_ENV)
    regions = sorted((read_yaml(path) or {}).get("regions") or {}) if path and os.path.exists(path) else []
    return Param(
        None,
        type=["null", "string"],
        **({"enum": [None, *regions]} if regions else {"pattern": REGION}),
        description="only shards whose users move from this region (the source, or a home they leave); empty: all",
    )


def dry_run_param(what: str):
    from airflow.sdk import Param

    return Param(False, type=["null", "boolean"], description=what)


def named_shards_params(what: str) -> dict[str, Any]:
    """The Params of a manual DAG that acts on shards an operator names, with a reason."""
    from airflow.sdk import Param

    return {
        "shards": shards_param(what, required=True),
        "wave": Param(None, type=["null", "string"], description="the wave, when a name is in several"),
        "reason": Param(type="string", minLength=3, description="why; recorded in the audit table"),
        "spec": spec_param(),
    }


def named_phase(what: str) -> list[dict[str, Any]]:
    """Run the manual DAG's phase (`what`, or the `mode` Param) on the shards its Params name."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    p = ctx["params"]
    spec = tasks.load(spec_path(p), resolve_conn, resolve_s3=resolve_s3)
    return tasks.named_phase(
        spec, ctx["run_id"], p["wave"], p["shards"], p.get("mode", what), p["reason"], bool(p.get("dry_run"))
    )


def spec_path(params: dict[str, Any]) -> str:
    """The spec file a run uses: the configured one its `spec` Param names, or the default."""
    from airflow.sdk.exceptions import AirflowFailException

    specs = configured_specs()
    name = params.get("spec") or "default"
    if name not in specs:
        if name == "default":
            raise AirflowFailException(f"no spec: set the {SPEC_ENV} environment variable (or {SPECS_ENV})")
        raise AirflowFailException(
            f"spec {name!r} is not one of the configured specs ({', '.join(sorted(specs)) or 'none'}; {SPECS_ENV})"
        )
    return specs[name]


def classified(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Terminal errors fail the task without retries; transient ones are waited out on the
    triggerer when the task can resume so (`outage`), else retried by Airflow. Only the
    error's class and the migrator's own message reach the log, never driver text."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        try:
            out = fn(*args, **kwargs)
        except AirflowSkipException:
            raise
        except Exception as exc:
            if retry_later(exc):
                from airflow.sdk import get_current_context

                from migrator.airflow import outage  # Airflow's trigger classes, only in a task

                outage.wait_out(exc, get_current_context()["task"], task_spec)  # defers, or fails past the budget
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

    return tasks.load(spec_path(get_current_context()["params"]), resolve_conn, resolve_s3=resolve_s3)
