"""Outages that heal without a person. A task that meets a store it cannot reach (after the
dispatcher's own retries from the checkpoint) does not fail and wait for Airflow's retry:
it defers to the triggerer, which holds no worker slot, until every store of the spec
that did not answer at that moment accepts a connection again, and then runs again from
its checkpoint. Only once its waits in one try add up to the spec's
`retry.outage_budget_s` does it fail for an operator to clear.

The trigger only opens a TCP connection to each store's host and port: it carries no
DSN, no key and no password (its arguments are kept in Airflow's database and shown in
its UI), and a store that accepts connections but still refuses the work (starting up,
full) sends the task back to waiting on its next failure.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from airflow.providers.common.compat.sdk import task_decorator_factory
from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from airflow.triggers.base import BaseTrigger, TriggerEvent
from psycopg.conninfo import conninfo_to_dict

from migrator.errors import describe
from migrator.spec import Spec

log = logging.getLogger("migrator.airflow.outage")

RESUME = "resume_after_outage"  # the method a deferred task comes back through
Address = tuple[str, int]


def addresses(spec: Spec) -> dict[str, Address]:
    """Every store of the spec by name ('region ie', 'control', 'S3 ie'), as host and port.
    Stores reached through a Unix socket are left out (they cannot be lost on a network)."""
    out: dict[str, Address] = {}
    for name, store in [*((f"region {r}", s) for r, s in sorted(spec.regions.items())), ("control", spec.control)]:
        try:
            info = conninfo_to_dict(store.url)
        except Exception:  # a DSN libpq cannot parse is the command's error, not an outage
            continue
        host = str(info.get("host") or info.get("hostaddr") or "localhost").split(",")[0]
        if host.startswith("/"):
            continue
        try:
            out[name] = (host, int(str(info.get("port") or 5432).split(",")[0]))
        except ValueError:
            continue
    for region, o in sorted((spec.objects.stores if spec.objects else {}).items()):
        if o.endpoint:
            u = urlsplit(o.endpoint)
            if u.hostname:
                out[f"S3 {region}"] = (u.hostname, u.port or (443 if u.scheme == "https" else 80))
    return out


def answers(addr: Address, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(addr, timeout=timeout):
            return True
    except OSError:
        return False


class StoresAnswer(BaseTrigger):
    """Fires once every address accepts a TCP connection (at once for none, after one
    poll), or when the outage budget's deadline (epoch seconds) has passed."""

    def __init__(self, stores: dict[str, list[Any]], deadline: float, poll_s: float):
        super().__init__()
        self.stores = {name: (str(a[0]), int(a[1])) for name, a in stores.items()}
        self.deadline, self.poll_s = float(deadline), float(poll_s)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "stores": {n: [h, p] for n, (h, p) in self.stores.items()},
                "deadline": self.deadline,
                "poll_s": self.poll_s,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        waiting = dict(self.stores)
        while True:
            await asyncio.sleep(self.poll_s)
            for name, (host, port) in list(waiting.items()):
                if await _answers(host, port, min(self.poll_s, 5.0)):
                    del waiting[name]
            if not waiting:
                yield TriggerEvent({"status": "answered"})
                return
            if time.time() >= self.deadline:
                yield TriggerEvent({"status": "budget", "stores": sorted(waiting)})
                return


async def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


def wait_out(exc: BaseException, operator: Any, spec_of: Callable[[], Spec]) -> None:
    """Called with a transient error inside a task: defers the task until the stores that
    do not answer now answer again (raises TaskDeferred), or fails it for good once the
    outage budget is spent. Returns only when the running operator cannot resume so
    (then Airflow's own retries take the error)."""
    if not callable(getattr(operator, RESUME, None)):
        return
    try:
        spec = spec_of()
    except Exception:
        return
    budget, now = spec.retry.outage_budget_s, time.time()
    waited = float(getattr(operator, "_waited_s", 0.0) or 0.0)
    left = budget - waited
    if left <= 0:
        raise AirflowFailException(
            f"{describe(exc)}; still failing after the outage budget ({budget:.0f} s, retry.outage_budget_s): "
            "clear this task once the store answers, and it resumes from its checkpoint"
        ) from None
    down = {name: list(a) for name, a in addresses(spec).items() if not answers(a)}
    log.warning(
        "transient: %s; waiting for %s without a worker slot (deferred, up to %.0f s more), then resuming "
        "from the checkpoint",
        describe(exc),
        ", ".join(sorted(down)) or "a moment",
        left,
    )
    raise TaskDeferred(
        trigger=StoresAnswer(down, now + left, spec.retry.outage_poll_s),
        method_name=RESUME,
        kwargs={"deferred_at": now, "waited_s": waited},
        # the trigger ends itself at the deadline; this is only a bound if it could not
        timeout=timedelta(seconds=left + 2 * spec.retry.outage_poll_s + 60),
    )


class Resumes:
    """An operator whose tasks come back through `resume_after_outage` after waiting out an
    outage: its `execute` runs again, from the phase's checkpoint."""

    _waited_s: float = 0.0  # this try's waits so far, against the outage budget

    def resume_after_outage(
        self, context: Any, event: dict[str, Any] | None = None, deferred_at: float = 0.0, waited_s: float = 0.0
    ) -> Any:
        event = event or {}
        if event.get("status") == "budget":
            raise AirflowFailException(
                f"{', '.join(event.get('stores') or ['a store'])} did not answer within the outage budget "
                "(retry.outage_budget_s): clear this task once it answers, and it resumes from its checkpoint"
            )
        wait = max(0.0, time.time() - deferred_at) if deferred_at else 0.0
        log.info("the stores answer again after %.0f s: resuming from the checkpoint", wait)
        self._waited_s = waited_s + wait
        return self.execute(context)  # type: ignore[attr-defined]


class StoreTaskOperator(Resumes, _PythonDecoratedOperator):
    """@task, with outages waited out on the triggerer."""

    custom_operator_name = "@store_task"


def store_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """Like `@task`, for tasks that reach the stores: a transient error defers the task until
    the stores answer (see the module), instead of failing it into Airflow's retries."""
    return task_decorator_factory(python_callable=python_callable, decorated_operator_class=StoreTaskOperator, **kwargs)
