"""Waiting out an outage in Airflow, without Airflow running: which stores a deferred task
waits for (and that its trigger carries no secret), the trigger's two endings over real
sockets, the budget, and the waves' short names that a run's note shows."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import time

import pytest

pytest.importorskip("airflow.sdk")

from airflow.sdk.exceptions import AirflowFailException, TaskDeferred  # noqa: E402

from migrator.airflow import outage, tasks  # noqa: E402
from migrator.spec import parse_spec  # noqa: E402
from tests.unit.test_units import BASE  # noqa: E402

pytestmark = pytest.mark.unit


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def _spec(us_port: int, ie_port: int, s3_port: int):
    d = copy.deepcopy(BASE)
    d["regions"]["us"]["dsn"] = f"postgresql://app:s3cret@127.0.0.1:{us_port}/app"
    d["regions"]["ie"]["dsn"] = f"host=127.0.0.1 port={ie_port} dbname=app user=x password=hunter22"
    d["control"]["dsn"] = f"postgresql://app:s3cret@127.0.0.1:{us_port}/control"
    d["objects"] = {
        "user_prefix": "users/{user}/",
        "stores": {
            "us": {"endpoint": f"http://127.0.0.1:{s3_port}", "bucket": "media-us", "secret_key": "sekrit-key"},
            "ie": {"bucket": "media-ie"},  # AWS's own endpoint: not probed
        },
    }
    return parse_spec(d)


def test_the_stores_waited_for_are_named_and_carry_no_secret():
    spec = _spec(5432, 6543, 9000)
    assert outage.addresses(spec) == {
        "region us": ("127.0.0.1", 5432),
        "region ie": ("127.0.0.1", 6543),
        "control": ("127.0.0.1", 5432),
        "S3 us": ("127.0.0.1", 9000),
    }
    trigger = outage.StoresAnswer({n: list(a) for n, a in outage.addresses(spec).items()}, time.time() + 60, 1)
    text = json.dumps(trigger.serialize())
    assert "s3cret" not in text and "hunter22" not in text and "sekrit" not in text and "dbname" not in text


class _Op(outage.Resumes):
    def __init__(self):
        self.runs = 0

    def execute(self, context):
        self.runs += 1
        return "done"


def test_a_transient_error_defers_the_task_to_wait_for_the_stores_that_do_not_answer():
    with socket.socket() as up:
        up.bind(("127.0.0.1", 0))
        up.listen(4)
        spec = _spec(up.getsockname()[1], _closed_port(), up.getsockname()[1])
        op = _Op()
        with pytest.raises(TaskDeferred) as deferred:
            outage.wait_out(RuntimeError("lost"), op, lambda: spec)
    d = deferred.value
    assert d.method_name == outage.RESUME and d.kwargs["waited_s"] == 0
    assert set(d.trigger.stores) == {"region ie"}  # only the store that did not answer
    assert d.trigger.deadline == pytest.approx(time.time() + spec.retry.outage_budget_s, abs=5)
    # an operator that cannot resume leaves the error to Airflow's retries
    assert outage.wait_out(RuntimeError("lost"), object(), lambda: spec) is None


def test_past_the_budget_the_task_fails_for_an_operator_and_a_resume_runs_it_again():
    spec = _spec(5432, 6543, 9000)
    op = _Op()
    op._waited_s = spec.retry.outage_budget_s
    with pytest.raises(AirflowFailException, match="outage budget"):
        outage.wait_out(RuntimeError("lost"), op, lambda: spec)
    with pytest.raises(AirflowFailException, match="region ie did not answer"):
        op.resume_after_outage({}, {"status": "budget", "stores": ["region ie"]}, time.time(), 10.0)
    op = _Op()
    assert op.resume_after_outage({}, {"status": "answered"}, time.time() - 30, 10.0) == "done"
    assert op.runs == 1 and op._waited_s == pytest.approx(40, abs=2)  # this try's waits, added up


async def _first_event(trigger):
    async for event in trigger.run():
        return event.payload


def test_the_trigger_fires_when_the_store_answers_or_at_its_deadline():
    port = _closed_port()
    ended = asyncio.run(_first_event(outage.StoresAnswer({"region ie": ["127.0.0.1", port]}, time.time() + 0.3, 0.1)))
    assert ended == {"status": "budget", "stores": ["region ie"]}

    async def comes_back():
        server = None

        async def start_later():
            nonlocal server
            await asyncio.sleep(0.4)
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)

        starting = asyncio.create_task(start_later())
        try:
            trigger = outage.StoresAnswer({"region ie": ["127.0.0.1", port]}, time.time() + 30, 0.1)
            t0 = time.monotonic()
            event = await _first_event(trigger)
            return event, time.monotonic() - t0
        finally:
            await starting
            server.close()

    event, took = asyncio.run(comes_back())
    assert event == {"status": "answered"} and took >= 0.4


@pytest.mark.parametrize(
    "run_id, wave",
    [
        ("manual__2026-12-07T11:23:39.123456+00:00", "all-20261207-1123-"),
        ("scheduled__2026-12-06T00:00:00+00:00", "all-20261206-0000-"),
        ("retry-ie-03", "all-retry-ie-03"),
        ("a run id with spaces and no date, long enough", "all-"),
    ],
)
def test_a_runs_own_wave_is_short_and_typeable(run_id, wave):
    got = tasks.wave_for("all", None, None, run_id)
    assert got.startswith(wave) and len(got) <= 28 and all(c.isalnum() or c in "-_." for c in got), got
    assert got == tasks.wave_for("all", None, None, run_id)  # every try of the plan names the same wave
    assert tasks.wave_for("all", None, None, run_id + "x") != got or len(run_id) <= 23
