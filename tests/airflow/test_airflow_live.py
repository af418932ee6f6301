"""A real Airflow: scheduler, dag-processor, triggerer and api-server as separate
processes (LocalExecutor, a PostgreSQL metadata database). A run is triggered through the
REST API with a conf and an approval before each cutover (one cutover task cleared while
it waits asks again), then a backfill over three daily intervals; the users each run
should have moved are worked out here from the runs' own data intervals and the source
rows. An outage right after an approval is waited out and the cutover runs without asking
again. A region down for minutes: its tasks wait deferred and the run ends green with no
click. A region down past the outage budget: clearing the failed tasks ends it green."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from datetime import datetime

import pytest

from migrator.demo.airflow_services import AirflowServices
from tests.conftest import DEMO_OWNED, ROOT, World
from tests.helpers import airflow_for, live_airflow, trigger

pytest.importorskip("airflow.sdk")
pytestmark = pytest.mark.airflow
OUT = ROOT / "tests" / "output"


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _approvals(af: AirflowServices, run: str) -> list[dict]:
    return [t for t in af.tasks("residency_migration", run) if t["task_id"] == "no.cutover" and t["map_index"] >= 0]


def _waiting(af: AirflowServices, run: str, count: int, try_number: int = 1, timeout: float = 300) -> list[dict]:
    """The run's cutover tasks once `count` of them wait for an answer in this try."""
    deadline = time.monotonic() + timeout
    while True:
        found = [t for t in _approvals(af, run) if t["state"] == "awaiting_input" and t["try_number"] >= try_number]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, [(t["map_index"], t["state"], t["try_number"]) for t in _approvals(af, run)]
        time.sleep(1)


def _deferral_settled(t: dict, timeout: float = 60) -> None:
    """Wait until the process that deferred the waiting task `t` is reaped, and then for the
    scheduler's next loops. Airflow 3.3 fails a resumed try whose deferring process's exit
    it takes in only after the answer has queued the resumed try ("task state changed
    externally"), and the retry asks again: an answer within a second of the question can
    be lost so. An approver reading the summary first never meets it."""
    pid, deadline = t.get("pid"), time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # still there, or a zombie not yet reaped by its supervisor
        except ProcessLookupError:
            break
        time.sleep(0.1)
    time.sleep(2)


def _approve_with_one_asked_again(af: AirflowServices, world: World, run: str) -> None:
    """Both Norwegian shards wait for approval; the first one's cutover task is cleared
    as an operator's "Clear" would (a new try): it asks again, nothing is cut over
    meanwhile, and an answer to a later try is what cuts it over. Whatever asks is
    answered until the run ends (Airflow may go through more than one new try)."""
    first = min(_waiting(af, run, 2), key=lambda t: t["map_index"])["map_index"]
    af.api(
        "POST",
        "/dags/residency_migration/clearTaskInstances",
        {
            "dry_run": False,
            "dag_run_id": run,
            "task_ids": [["no.cutover", first]],
            "only_failed": False,
            "include_downstream": False,
        },
    )
    _waiting(af, run, 1, try_number=2)
    assert {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'")} == {"verified"}
    answered: set[tuple[int, int]] = set()
    deadline = time.monotonic() + 600
    while af.api("GET", f"/dags/residency_migration/dagRuns/{run}")["state"] not in ("success", "failed"):
        assert time.monotonic() < deadline, "the run did not end"
        for t in _approvals(af, run):
            if t["state"] != "awaiting_input" or (t["map_index"], t["try_number"]) in answered:
                continue
            path = f"/dags/residency_migration/dagRuns/{run}/taskInstances/no.cutover/{t['map_index']}/hitlDetails"
            assert "Last verify: matched" in af.api("GET", path)["body"]  # the same question, on every try
            af.api("PATCH", path, {"chosen_options": ["Approve"], "params_input": {}})
            answered.add((t["map_index"], t["try_number"]))
        time.sleep(1)
    assert af.api("GET", f"/dags/residency_migration/dagRuns/{run}")["state"] == "success"
    assert max(n for m, n in answered if m == first) >= 2  # the cleared task was answered on a new try
    assert {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'")} == {"cut_over"}
    # the run's own wave planned Norway only: Ireland's users are left to the intervals' runs
    assert world.ctl("SELECT DISTINCT region FROM migrator.shard WHERE wave LIKE 'all-%%'") == [("no",)]


def test_live_airflow_rest_trigger_and_backfill(world: World, tmp_path):
    with live_airflow(world, tmp_path) as af:
        # an operator's manual run from the API: every user bound for Norway, each cutover
        # approved first; one cutover task is cleared while it waits, and asks again
        manual = trigger(af, {"scope": "all", "regions": ["no"], "approve_cutover": True})
        _approve_with_one_asked_again(af, world, manual)
        # and a backfill over three days of the seeded sign-ups
        res = af.cli(
            "backfill",
            "create",
            "--dag-id",
            "residency_migration",
            "--from-date",
            "2026-11-21",
            "--to-date",
            "2026-11-23",
        )
        assert res.returncode == 0, res.stderr[-2000:]
        runs = af.wait_runs("residency_migration", 4)
    assert all(r["state"] == "success" for r in runs), [(r["dag_run_id"], r["state"]) for r in runs]
    # the task API's tokens were signed with a secret long enough for their algorithm
    assert "HMAC key" not in (af.home / "api-server.log").read_text()
    backfilled = [r for r in runs if r["run_type"] == "backfill"]
    assert len(backfilled) == 3

    # expected homes, from the runs' intervals and the source rows (scheduled runs count too)
    policy = world.spec["policy"]
    users = world.rows("us", "SELECT user_id, country_code, created_at FROM users")
    expected: dict[int, str] = {}
    for r in runs:
        conf = r.get("conf") or {}
        if conf.get("scope") == "all":
            regions = conf.get("regions") or ["ie", "no"]
            for uid, cc, _ in users:
                if policy.get(cc) in regions:
                    expected[uid] = policy[cc]
    for r in runs:
        if (r.get("conf") or {}).get("scope") == "all":
            continue
        start, end = _ts(r["data_interval_start"]), _ts(r["data_interval_end"])
        for uid, cc, created in users:
            if start <= created < end and policy.get(cc) not in (None, "us"):
                expected.setdefault(uid, policy[cc])
    moved = {int(k): h for k, h in world.ctl("SELECT user_key, home FROM migrator.directory WHERE home <> 'us'")}
    assert moved == expected
    # each backfilled day moved its EU users
    for r in backfilled:
        start, end = _ts(r["data_interval_start"]), _ts(r["data_interval_end"])
        day = [uid for uid, cc, created in users if start <= created < end and policy.get(cc) == "ie"]
        assert day and all(moved.get(u) == "ie" for u in day)
    for region in ("ie", "no"):
        ids = [u for u, h in moved.items() if h == region]
        for table, q in DEMO_OWNED.items():
            assert world.rows("us", q, (ids,)) == world.rows(region, q, (ids,)), table


def test_region_down_past_the_outage_budget_its_shards_fail_resumable_then_clearing_them_ends_green(
    world: World, tmp_path
):
    """IE is down for longer than the outage budget: planning and the Norway shards go on,
    the IE shards wait deferred, then fail without rolling back; IE comes back; "clear only
    failed tasks" resumes them and the run ends green."""
    world.write_spec(
        sharding={"shards_per_region": 2},
        retry={
            "attempts": 2,
            "initial_wait_s": 0.1,
            "max_wait_s": 0.2,
            "outage_s": 1,
            "outage_budget_s": 8,
            "outage_poll_s": 1,
        },
    )
    home, env, meta = airflow_for(world, tmp_path, MIGRATOR_TASK_RETRIES="1", MIGRATOR_TASK_RETRY_DELAY_S="1")
    af = AirflowServices(home, env, meta, migrated=True)
    ie = world.cluster["ie"]
    af.start()
    try:
        af.wait_for_dag("residency_migration")
        af.api("PATCH", "/dags/residency_migration", {"is_paused": False})
        ie.stop()
        try:
            run_id = af.api(
                "POST", "/dags/residency_migration/dagRuns", {"logical_date": None, "conf": {"scope": "all"}}
            )["dag_run_id"]
            af.run_state("residency_migration", run_id, {"failed", "success"})
        finally:
            ie.start()
        first = af.tasks("residency_migration", run_id)
        states = dict(world.ctl("SELECT name, state FROM migrator.shard"))
        assert {v for k, v in states.items() if k.startswith("no-")} == {"cut_over"}, states
        assert {v for k, v in states.items() if k.startswith("ie-")} == {"planned"}, states  # not rolled back
        rollbacks = {t["state"] for t in first if t["task_id"].endswith(".rollback")}
        assert "success" not in rollbacks, first  # no rollback did work
        af.api(
            "POST",
            "/dags/residency_migration/clearTaskInstances",
            {"dry_run": False, "only_failed": True, "dag_run_id": run_id},
        )
        run = af.run_state("residency_migration", run_id, {"success", "failed"})
        again = af.tasks("residency_migration", run_id)
    finally:
        af.stop()
    assert run["state"] == "success", [(t["task_id"], t.get("rendered_map_index"), t["state"]) for t in again]
    assert set(dict(world.ctl("SELECT name, state FROM migrator.shard")).values()) == {"cut_over"}
    ie_copies = [t for t in again if t["task_id"] == "ie.copy"]
    assert ie_copies and all(t["state"] == "success" for t in ie_copies)
    ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie'")]
    assert ids
    for table, q in DEMO_OWNED.items():
        assert world.rows("us", q, (ids,)) == world.rows("ie", q, (ids,)), table


OUTAGE_S = float(os.environ.get("MIGRATOR_TEST_OUTAGE_S", "20"))  # the console's trial: 210


def _view(af: AirflowServices) -> dict:
    """The Residency view's snapshot, as the page reads it (signed in)."""
    req = urllib.request.Request(f"{af.base}/residency/api/snapshot", headers={"Authorization": f"Bearer {af.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _page_in_chromium(af: AirflowServices) -> str:
    """The Residency view's page as Chromium shows it to a signed-in user (the UI's cookie)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.add_cookies([{"name": "_token", "value": af.token, "url": af.base}])
        page = context.new_page()
        page.goto(f"{af.base}/residency/", wait_until="domcontentloaded", timeout=60000)
        OUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUT / "ui-residency-outage.png"), full_page=True)
        text = page.inner_text("body")
        browser.close()
    return text


@pytest.mark.browser
def test_a_region_down_for_minutes_is_waited_out_and_the_run_ends_green_with_no_click(world: World, tmp_path):
    """A copy in progress shows in the Residency view with its state, batches and ETA. Then
    IE goes down mid-copy for longer than the dispatcher's retries and Airflow's: its
    shards' tasks wait deferred (no worker slot, no retry spent) while the view names the
    store, then resume from their checkpoints when IE answers; the run ends green, every
    shard cut over, nothing rolled back, and no task needed a second try."""
    world.write_spec(
        sharding={"shards_per_region": 2},
        copy={"batch_users": 5},
        retry={"attempts": 2, "initial_wait_s": 0.1, "max_wait_s": 0.2, "outage_s": 1, "outage_poll_s": 2},
    )
    ie = world.cluster["ie"]
    hold = tmp_path / "hold"  # while it exists, the copies' lanes stay after their last batch
    with live_airflow(
        world,
        tmp_path,
        MIGRATOR_TASK_RETRIES="1",
        MIGRATOR_TASK_RETRY_DELAY_S="1",
        # every lane pauses a moment after each batch: the copies are in progress long enough to watch
        MIGRATOR_PAUSE_AT="committed batch",
        MIGRATOR_PAUSE_S="2",
        MIGRATOR_PAUSE_HOLD=str(hold),
    ) as af:
        run_id = af.api("POST", "/dags/residency_migration/dagRuns", {"logical_date": None, "conf": {"scope": "all"}})[
            "dag_run_id"
        ]
        deadline = time.monotonic() + 300
        while not world.ctl("SELECT to_regclass('migrator.checkpoint') IS NOT NULL")[0][0] or not world.ctl(
            "SELECT 1 FROM migrator.shard s WHERE s.region = 'ie' AND s.state = 'copying' "
            "AND (SELECT count(*) FROM migrator.checkpoint c WHERE c.shard_id = s.shard_id) >= 2 "
            "AND (SELECT count(*) FROM migrator.checkpoint c WHERE c.shard_id = s.shard_id) < s.batches - 1"
        ):
            assert time.monotonic() < deadline, world.ctl("SELECT name, state, batches FROM migrator.shard")
            time.sleep(0.3)
        # held there while a browser looks and IE goes down (on a loaded machine the looking
        # alone could outlast the rest of the copy, leaving no copy for the outage to meet)
        hold.touch()
        progress = _page_in_chromium(af)  # a copy in progress: its state, batches done and ETA
        assert re.search(r"ie-\d+\tus→ie\tcopying\t\d+\t[2-9]\d*/\d+\t\d+\t[^\t]*\t\d+ s\b", progress), progress
        ie.stop()
        hold.unlink()
        down_at, deferred, named, page = time.monotonic(), set(), set(), ""
        try:
            while time.monotonic() - down_at < OUTAGE_S:
                for t in af.tasks("residency_migration", run_id):
                    if t["task_id"].startswith("ie.") and t["state"] == "deferred":
                        deferred.add((t["task_id"], t["map_index"]))
                    assert t["state"] not in ("failed", "up_for_retry"), t
                waves = _view(af)["waves"].values()
                named |= {r["name"] for rows in waves for r in rows if "region ie" in (r.get("error") or "")}
                if named and not page:  # the page itself, in a browser, while the region is down
                    page = _page_in_chromium(af)
                time.sleep(2)
        finally:
            ie.start()
        run = af.run_state("residency_migration", run_id, {"success", "failed"})
        tis = af.tasks("residency_migration", run_id)
    assert deferred, "no IE task waited deferred"
    assert named, "the view did not name the store that was down"
    assert re.search(r"ie-\d+.*region ie \(127\.0\.0\.1:\d+/", page), page  # a shard's row names the store
    assert run["state"] == "success", [(t["task_id"], t.get("rendered_map_index"), t["state"]) for t in tis]
    assert set(dict(world.ctl("SELECT name, state FROM migrator.shard")).values()) == {"cut_over"}
    assert all(t["try_number"] == 1 for t in tis if t["task_id"].startswith("ie.") and t["state"] == "success"), tis
    assert not [t for t in tis if t["task_id"].endswith(".rollback") and t["state"] == "success"]  # none did work
    ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie'")]
    assert ids
    for table, q in DEMO_OWNED.items():
        assert world.rows("us", q, (ids,)) == world.rows("ie", q, (ids,)), table


def test_an_outage_after_the_approval_is_waited_out_and_the_cutover_runs_without_asking_again(world: World, tmp_path):
    """Norway's shard waits for its approval; Norway goes down and the approver approves:
    the cutover meets the outage and waits for Norway, deferred. Norway comes back and the
    same try cuts over on the recorded answer: it never waits for an answer again."""
    world.write_spec(
        sharding={"shards_per_region": 1},
        retry={"attempts": 2, "initial_wait_s": 0.1, "max_wait_s": 0.2, "outage_s": 1},
    )
    no = world.cluster["no"]
    with live_airflow(world, tmp_path, MIGRATOR_TASK_RETRIES="4", MIGRATOR_TASK_RETRY_DELAY_S="2") as af:
        run = trigger(af, {"scope": "all", "regions": ["no"], "approve_cutover": True})
        (waiting,) = _waiting(af, run, 1)
        path = f"/dags/residency_migration/dagRuns/{run}/taskInstances/no.cutover/{waiting['map_index']}/hitlDetails"
        _deferral_settled(waiting)
        no.stop()
        try:
            af.api("PATCH", path, {"chosen_options": ["Approve"], "params_input": {}})
            deadline = time.monotonic() + 300
            while True:  # the approved try meets the outage and waits for Norway
                (t,) = _approvals(af, run)
                if t["state"] == "deferred":
                    break
                assert t["state"] not in ("success", "failed"), t
                assert time.monotonic() < deadline, t
                time.sleep(0.5)
            assert world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'") == [("verified",)]
        finally:
            no.start()
        tries: list[tuple[int, str]] = []
        deadline = time.monotonic() + 300
        while af.api("GET", f"/dags/residency_migration/dagRuns/{run}")["state"] not in ("success", "failed"):
            assert time.monotonic() < deadline, "the run did not end"
            (t,) = _approvals(af, run)
            tries.append((t["try_number"], t["state"]))
            time.sleep(0.5)
        (t,) = _approvals(af, run)
        state = af.api("GET", f"/dags/residency_migration/dagRuns/{run}")["state"]
    assert state == "success", t
    assert t["state"] == "success" and t["try_number"] == 1, t  # no retry was needed
    assert not [s for n, s in tries if s == "awaiting_input"], tries  # never asked again
    assert world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'") == [("cut_over",)]
    events = [e for (e,) in world.ctl("SELECT detail->>'event' FROM migrator.audit ORDER BY id")]
    assert "cutover interrupted" in events[events.index("cutover approved") :], events  # the outage hit after it
    answers = world.ctl(
        "SELECT detail->>'event', detail->>'by' FROM migrator.audit "
        "WHERE detail->>'event' IN ('cutover approved', 'cutover rejected')"
    )
    assert len(answers) == 1 and answers[0][0] == "cutover approved" and answers[0][1], answers  # answered once
    ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'no'")]
    assert ids
    for table, q in DEMO_OWNED.items():
        assert world.rows("us", q, (ids,)) == world.rows("no", q, (ids,)), table


def test_a_rejection_without_a_reason_is_refused_and_asked_again(world: World, tmp_path):
    """Rejected with an empty reason: nothing is done (the shard stays verified, no answer is
    recorded) and the task fails saying why; cleared, it asks again, and a rejection with
    its reason rolls the shard back with that reason."""
    world.write_spec(sharding={"shards_per_region": 1})
    with live_airflow(world, tmp_path) as af:
        run = trigger(af, {"scope": "all", "regions": ["no"], "approve_cutover": True})
        (waiting,) = _waiting(af, run, 1)
        path = f"/dags/residency_migration/dagRuns/{run}/taskInstances/no.cutover/{waiting['map_index']}"
        _deferral_settled(waiting)
        af.api("PATCH", path + "/hitlDetails", {"chosen_options": ["Reject"], "params_input": {"reason": " "}})
        deadline = time.monotonic() + 300
        while (t := _approvals(af, run)[0])["state"] != "failed":
            assert t["state"] not in ("success", "skipped"), t
            assert time.monotonic() < deadline, t
            time.sleep(0.5)
        assert world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'") == [("verified",)]
        assert world.ctl("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'cutover rejected'") == [(0,)]
        af.api(
            "POST",
            "/dags/residency_migration/clearTaskInstances",
            {
                "dry_run": False,
                "dag_run_id": run,
                "task_ids": [["no.cutover", waiting["map_index"]]],
                "only_failed": True,
            },
        )
        (again,) = _waiting(af, run, 1, try_number=2)
        _deferral_settled(again)
        af.api(
            "PATCH",
            path + "/hitlDetails",
            {"chosen_options": ["Reject"], "params_input": {"reason": "ticket 5: not this week"}},
        )
        deadline = time.monotonic() + 300
        while world.ctl("SELECT state FROM migrator.shard WHERE region = 'no'") != [("rolled_back",)]:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    reasons = world.ctl("SELECT detail->>'reason' FROM migrator.audit WHERE detail->>'event' = 'rolled back'")
    assert [r for (r,) in reasons if r and "ticket 5: not this week" in r], reasons
