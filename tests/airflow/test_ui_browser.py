"""The operator's way in, in a real browser: `migrator demo --ui` leaves the stores and
Airflow running; Debian's chromium (driven by Playwright) logs in, finds the project's
DAGs and their docs, submits a dry run for Ireland from the trigger form and reads the
plan in the plan task's log, starts a two-day backfill from the trigger dialog (its
runs move each day's sign-ups), runs the migration for real with an approval before each
cutover (all approved but one, rejected with a reason, which rolls that shard back; one
approved and the rejected one answered by clicking in the approval's Required Actions
tab, the others through the REST API), and rolls another shard back through a form that
refuses an empty reason. What moved is checked in the stores with SQL written here.
Screenshots go to tests/output/ui-*.png."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
import yaml

from migrator.demo.airflow_services import RestClient
from tests.conftest import DEMO_OWNED, ROOT

pytest.importorskip("airflow.sdk")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.airflow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"  # Debian's package: browsers are not downloaded here
OUT = ROOT / "tests" / "output"


def _free_base() -> int:
    """A base port with the 21 ports the demo takes above it free, below the kernel's
    ephemeral range: a port in it can be taken, between this check and the demo's bind, as
    the local port of any outgoing connection or by another test's free port."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for base in range(low - 9000, low - 21, 97):
        try:
            for port in range(base, base + 21):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free range of ports")


def _migrator(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "migrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-demo")
    res = _migrator("demo", "--ui", str(folder), "--users", "400", "--port-base", str(_free_base()), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    env = {}
    for line in Path(info["env_file"]).read_text().splitlines():
        if line.startswith("export "):
            k, _, v = line[len("export ") :].partition("=")
            env[k] = v.strip("'")
    info["env"] = env
    try:
        yield info
    finally:
        stopped = _migrator("demo", "--stop", str(folder), "--json", timeout=180)
        assert stopped.returncode == 0, stopped.stderr[-2000:]


def _api(info: dict) -> RestClient:
    api = RestClient(info["url"], (info["user"], info["password"]))
    assert api.login(), "the demo's api-server does not answer"
    return api


def _finished(api: RestClient, dag_id: str, run_id: str, timeout: float = 600) -> str:
    return api.run_state(dag_id, run_id, {"success", "failed"}, timeout)["state"]


def _goto(page, url: str) -> None:
    """Open `url`; a navigation the app itself was still making (its redirect after the
    login) aborts the first try, so it is tried again once that one has settled."""
    try:
        page.goto(url)
    except sync_api.Error as exc:
        if "ERR_ABORTED" not in str(exc):
            raise
        page.wait_for_load_state("networkidle")
        page.goto(url)
    page.wait_for_load_state("networkidle")


def _login(page, info: dict) -> None:
    page.goto(info["url"])
    page.get_by_label("Username").fill(info["user"])
    page.get_by_label("Password").fill(info["password"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth" not in url, timeout=60000)  # the app's redirect after the login
    page.wait_for_load_state("networkidle")


def _trigger_form(page, info: dict, dag_id: str):
    _goto(page, f"{info['url']}/dags/{dag_id}")
    page.get_by_role("button", name=re.compile("^Trigger")).first.click()
    return page.locator("[role=dialog][data-scope=dialog]")  # not the date pickers' popovers


def _choose(page, combobox, value: str) -> None:
    combobox.click()
    page.keyboard.type(value)
    page.keyboard.press("Enter")


def _submitted_run(page, dag_id: str) -> str:
    page.wait_for_url(re.compile(rf".*/dags/{dag_id}/runs/.+"), timeout=30000)
    return urllib.request.unquote(page.url.rsplit("/runs/", 1)[1].split("/")[0])


def _backfill_runs(api: RestClient, timeout: float = 600) -> list[dict]:
    """The backfill's two runs, once both have ended: each succeeded, one per day."""
    deadline = time.monotonic() + timeout
    while True:
        runs = api.api("GET", "/dags/residency_migration/dagRuns?limit=100")["dag_runs"]
        bf = [r for r in runs if r["run_type"] == "backfill"]
        if len(bf) == 2 and all(r["state"] in ("success", "failed") for r in bf):
            break
        assert time.monotonic() < deadline, [(r["dag_run_id"], r["state"]) for r in bf]
        time.sleep(3)
    assert all(r["state"] == "success" for r in bf), [(r["dag_run_id"], r["state"]) for r in bf]
    days = sorted(r["data_interval_start"][:10] for r in bf)
    assert days == ["2026-11-21", "2026-11-22"], days
    return [{"start": r["data_interval_start"], "end": r["data_interval_end"]} for r in bf]


def _wave(api: RestClient, run: str) -> str:
    """The wave a manual run of every user planned, as its run's note names it."""
    note = api.api("GET", f"/dags/residency_migration/dagRuns/{urllib.parse.quote(run)}")["note"] or ""
    assert re.fullmatch(r"wave all-[A-Za-z0-9_.-]{4,24}", note), note  # short and typeable
    return note.removeprefix("wave ")


def _sql(dsn: str, q: str, args=()) -> list[tuple]:
    with psycopg.connect(dsn) as c:
        return c.execute(q, args).fetchall()


def _approvals(api: RestClient, run: str) -> tuple[list[dict], list[dict]]:
    tis = api.api("GET", f"/dags/residency_migration/dagRuns/{run}/taskInstances?limit=300")["task_instances"]
    planned = [t for t in tis if t["task_id"].endswith(".cutover") and t["map_index"] >= 0]
    return planned, [t for t in planned if t["state"] == "awaiting_input"]


def _answer_in_ui(page, url: str, run: str, t: dict, reason: str | None) -> None:
    """As an approver in the browser: the cutover task's Required Actions tab, its
    summary read, then Approve, or the reason typed and Reject."""
    _goto(page, f"{url}/dags/residency_migration/runs/{run}/tasks/{t['task_id']}/mapped/{t['map_index']}")
    try:
        page.get_by_role("link", name=re.compile("^Required Action")).click()  # "(1)", "s (2)"
    except sync_api.Error:
        page.screenshot(path=str(OUT / "ui-approval-failed.png"), full_page=True)
        (OUT / "ui-approval-failed.txt").write_text(page.url + "\n" + page.inner_text("body"))
        raise
    page.get_by_text("Last verify: matched").first.wait_for(timeout=30000)
    assert page.get_by_text("rows (source = destination)").first.is_visible()
    if reason is None:
        page.get_by_role("button", name="Approve", exact=True).click()  # no reason needed to approve
    else:
        page.get_by_role("group").filter(has_text=re.compile(r"^reason")).get_by_role("textbox").fill(reason)
        page.screenshot(path=str(OUT / "ui-reject.png"), full_page=True)
        page.get_by_role("button", name="Reject", exact=True).click()


def _answer(api: RestClient, run: str, t: dict, reject: str, reason: str, ui=None) -> str:
    path = f"/dags/residency_migration/dagRuns/{run}/taskInstances/{t['task_id']}/{t['map_index']}/hitlDetails"
    d = api.api("GET", path)
    name = re.match(r"Cut over shard ([a-z]+-\d+) to [a-z]+\?$", d["subject"]).group(1)
    assert "Last verify: matched" in d["body"] and "| users |" in d["body"], d["body"]
    assert set(d["params"]) == {"reason"}  # the approver is asked for a reason only
    if ui is not None and name in ui["shards"]:
        _answer_in_ui(ui["page"], ui["url"], run, t, reason if name == reject else None)
        deadline = time.monotonic() + 60  # the click's answer, as the API then has it
        while not (d := api.api("GET", path))["response_received"]:
            assert time.monotonic() < deadline, d
            time.sleep(1)
        assert d["chosen_options"] == ["Reject" if name == reject else "Approve"], d
        ui["answered"].add(name)
        return name
    answer = {"chosen_options": ["Reject"], "params_input": {"reason": reason}} if name == reject else None
    api.api("PATCH", path, answer or {"chosen_options": ["Approve"], "params_input": {}})
    return name


def _answer_approvals(api: RestClient, ctl: str, run: str, reject: str, reason: str, ui=None) -> set[str]:
    """As an approver would: wait for every shard's approval request, check what it shows,
    approve all but the shard `reject`, reject that one; and answer again whatever asks
    again (a try Airflow retried) until the run ends. The shards in `ui["shards"]` are
    answered in the browser, the others through the REST API, as an approver's tool would."""
    deadline = time.monotonic() + 600
    while True:
        planned, waiting = _approvals(api, run)
        if planned and len(waiting) == len(planned):
            break
        assert time.monotonic() < deadline, [(t["task_id"], t["map_index"], t["state"]) for t in planned]
        time.sleep(2)
    # nothing of this run is cut over before its approval
    states = _sql(ctl, "SELECT DISTINCT state FROM migrator.shard WHERE wave = %s", (_wave(api, run),))
    assert {s for (s,) in states} <= {"verified", "planned"}
    if ui is not None:  # the Residency view lists each of them, linked to its Required Actions
        page = ui["page"]
        _goto(page, f"{ui['url']}/residency/")
        page.locator("#approvals li[data-shard]").first.wait_for(timeout=30000)
        listed = {li.get_attribute("data-shard") for li in page.locator("#approvals li[data-shard]").all()}
        assert {t["rendered_map_index"] for t in waiting} <= listed, listed
    answered = {
        (t["task_id"], t["map_index"], t["try_number"]): _answer(api, run, t, reject, reason, ui) for t in waiting
    }
    while api.api("GET", f"/dags/residency_migration/dagRuns/{run}")["state"] not in ("success", "failed"):
        assert time.monotonic() < deadline + 900, "the run did not end"
        for t in _approvals(api, run)[1]:
            key = (t["task_id"], t["map_index"], t["try_number"])
            if key not in answered:
                answered[key] = _answer(api, run, t, reject, reason)
        time.sleep(2)
    return set(answered.values())


def test_an_operator_runs_the_migration_from_the_ui(demo):
    OUT.mkdir(exist_ok=True)
    api, env = _api(demo), demo["env"]
    # a fresh demo runs nothing before the operator acts: no scheduled run, nothing red
    names = ["residency_migration", "residency_rollback", "residency_release", "residency_purge", "residency_audit"]
    for _ in range(5):  # the scheduler's loops after the DAGs were parsed and unpaused
        assert not [(n, r["state"]) for n in names for r in api.runs(n)]
        time.sleep(2)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _login(page, demo)

        # the project's DAGs, and only them, with their docs
        _goto(page, f"{demo['url']}/dags")
        for n in names:  # the list renders after the page has loaded
            page.get_by_text(n, exact=True).first.wait_for(timeout=60000)
        listed = page.inner_text("body")
        assert all(n in listed for n in names) and "example_" not in listed
        assert re.search(r"\b5 Dags\b", listed), listed[:500]
        page.screenshot(path=str(OUT / "ui-dags.png"))
        _goto(page, f"{demo['url']}/dags/residency_migration")
        page.get_by_role("button", name="Dag Docs").click()
        assert page.get_by_text("Scheduled residency runs", exact=False).first.is_visible()
        page.keyboard.press("Escape")

        # a dry run for Ireland from the form: the plan is in the plan task's log
        form = _trigger_form(page, demo, "residency_migration")
        _choose(page, form.get_by_role("combobox", name="scope"), "all")
        _choose(page, form.get_by_role("combobox", name="Select one or multiple values"), "ie")
        form.locator("label:has(input[name=element_dry_run])").click()
        assert form.get_by_role("checkbox", name="dry_run").is_checked()
        form.screenshot(path=str(OUT / "ui-dry-run-form.png"))
        form.get_by_role("button", name="Trigger").click()
        dry = _submitted_run(page, "residency_migration")
        assert _finished(api, "residency_migration", dry) == "success"
        _goto(page, f"{demo['url']}/dags/residency_migration/runs/{dry}/tasks/plan")
        page.get_by_text("dry run: wave").first.wait_for(timeout=30000)
        log = page.inner_text("body")
        assert "ie-00" in log and "no-00" not in log, log[:2000]
        page.screenshot(path=str(OUT / "ui-dry-run-plan.png"), full_page=True)
        # and it wrote nothing: no shard planned
        if _sql(env["MIGRATOR_CONTROL_DSN"], "SELECT to_regclass('migrator.shard')")[0][0]:
            assert _sql(env["MIGRATOR_CONTROL_DSN"], "SELECT count(*) FROM migrator.shard") == [(0,)]

        # a two-day backfill from the trigger dialog: each run moves its day's sign-ups
        form = _trigger_form(page, demo, "residency_migration")
        form.get_by_text("Backfill", exact=True).first.click()
        for i, day in enumerate(["2026/11/21", "2026/11/22"]):  # From, To
            form.get_by_test_id("datetime-input").nth(i).click()
            picker = page.locator("[data-scope=popover][data-part=content]:visible").last
            picker.get_by_placeholder("YYYY/MM/DD").fill(day)
            picker.get_by_placeholder("HH:mm").fill("00:00")
            page.keyboard.press("Escape")  # closes the picker, not the dialog
        form.get_by_text("2 runs will be triggered.").wait_for(timeout=30000)
        form.screenshot(path=str(OUT / "ui-backfill-form.png"))
        form.get_by_role("button", name="Run Backfill").click()
        page.get_by_text("Backfill generated").first.wait_for(timeout=30000)
        backfilled = _backfill_runs(api)

        # the real run, every region, each cutover waiting for an approval: one is rejected;
        # ie-01 is approved and no-03 rejected in the browser, the others through the API
        form = _trigger_form(page, demo, "residency_migration")
        _choose(page, form.get_by_role("combobox", name="scope"), "all")
        form.locator("label:has(input[name=element_approve_cutover])").click()
        form.get_by_role("button", name="Trigger").click()
        real = _submitted_run(page, "residency_migration")
        ui = {"page": page, "url": demo["url"], "shards": {"ie-01", "no-03"}, "answered": set()}
        asked = _answer_approvals(api, env["MIGRATOR_CONTROL_DSN"], real, "no-03", "ticket 7: not this week", ui)
        assert len(asked) == 8 and "no-03" in asked
        assert ui["answered"] == {"ie-01", "no-03"}
        assert _finished(api, "residency_migration", real, timeout=900) == "failed"  # no-03 did not cut over
        tis = api.api("GET", f"/dags/residency_migration/dagRuns/{real}/taskInstances?limit=200")["task_instances"]
        cut = {t["rendered_map_index"] for t in tis if t["task_id"].endswith(".cutover") and t["state"] == "success"}
        _goto(page, f"{demo['url']}/dags/residency_migration/runs/{real}")
        page.get_by_text("report", exact=True).first.wait_for(timeout=60000)  # the grid has rendered
        # the screenshot's groups expanded where the grid offers it (the button follows the
        # view the approver's pages left behind)
        expand = page.get_by_role("button", name="Expand all task groups")
        if expand.count():
            expand.first.click()
            page.wait_for_timeout(1500)
        page.screenshot(path=str(OUT / "ui-run.png"), full_page=True)

        # a rollback needs a reason: the form will not submit without one
        # the run's page shows its wave, as the forms take it
        wave = _wave(api, real)
        _goto(page, f"{demo['url']}/dags/residency_migration/runs/{urllib.parse.quote(real)}")
        page.get_by_text(wave).first.wait_for(timeout=30000)
        form = _trigger_form(page, demo, "residency_rollback")
        form.get_by_role("textbox", name="Enter each string on a new line").fill("ie-00")
        # the backfill's waves have an ie-00 too: the wave says which
        form.get_by_role("group").filter(has_text=re.compile(r"^wave")).get_by_role("textbox").fill(wave)
        assert form.get_by_role("button", name="Trigger").is_disabled()
        assert "This field is required" in form.inner_text()
        form.screenshot(path=str(OUT / "ui-rollback-form.png"))
        form.get_by_role("group").filter(has_text=re.compile(r"^reason")).get_by_role("textbox").fill(
            "ticket 42: rolled back from the UI"
        )
        assert form.get_by_role("button", name="Trigger").is_enabled()
        form.get_by_role("button", name="Trigger").click()
        rb = _submitted_run(page, "residency_rollback")
        assert _finished(api, "residency_rollback", rb) == "success"
        browser.close()

    # what the stores say, independently of the UI (the run's own wave: the approval test's
    # Norwegian shards came before)
    ctl = env["MIGRATOR_CONTROL_DSN"]
    states = dict(_sql(ctl, "SELECT name, state FROM migrator.shard WHERE wave = %s", (wave,)))
    assert states.pop("ie-00") == "rolled_back" and states.pop("no-03") == "rolled_back"
    assert set(states.values()) == {"cut_over"} and len(states) == 6, states
    assert cut == {*states, "ie-00"}
    rejected = _sql(ctl, "SELECT detail->>'reason' FROM migrator.audit WHERE detail->>'event' = 'rolled back'")
    assert ("cutover rejected by operator: ticket 7: not this week",) in rejected
    reason = _sql(
        ctl,
        "SELECT count(*) FROM migrator.audit "
        "WHERE detail->>'event' = 'rolled back' AND detail->>'reason' LIKE 'ticket 42%%'",
    )
    assert reason == [(1,)]
    # each backfilled day's EU sign-ups were moved by that day's run (before the real run)
    policy = yaml.safe_load(Path(demo["spec"]).read_text())["policy"]
    users = _sql(env["MIGRATOR_US_DSN"], "SELECT user_id, country_code, created_at FROM users")
    for r in backfilled:
        start, end = (datetime.fromisoformat(r[k].replace("Z", "+00:00")) for k in ("start", "end"))
        day = {u: policy[cc] for u, cc, at in users if start <= at < end and policy.get(cc) in ("ie", "no")}
        assert day, (start, end)
        moved = _sql(
            ctl,
            "SELECT d.user_key, d.home FROM migrator.directory d JOIN migrator.shard_user u USING (user_key) "
            "JOIN migrator.shard s ON s.shard_id = u.shard_id WHERE s.wave LIKE %s",
            (f"interval-{start:%Y%m%dT%H%M}-%",),
        )
        assert {int(k): h for k, h in moved} == day, r
    for region in ("ie", "no"):
        ids = [int(k) for (k,) in _sql(ctl, "SELECT user_key FROM migrator.directory WHERE home = %s", (region,))]
        assert ids
        for table, q in DEMO_OWNED.items():
            assert _sql(env["MIGRATOR_US_DSN"], q, (ids,)) == _sql(env[f"MIGRATOR_{region.upper()}_DSN"], q, (ids,)), (
                region,
                table,
            )


def _runbook_sections() -> list[tuple[str, list[str]]]:
    """Every command of RUNBOOK.md, by section, as the runbook prints it."""
    sections: list[tuple[str, list[str]]] = []
    title, inside = "", False
    for line in (ROOT / "RUNBOOK.md").read_text().splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("```"):
            inside = not inside
            if inside:
                sections.append((title, []))
        elif inside and line.split("#")[0].strip():
            sections[-1][1].append(line.split("  #")[0].strip())
    return sections


def test_every_runbook_command_runs_against_the_demo(demo, tmp_path):
    """Each command block of RUNBOOK.md, run as an operator would paste it (a shell with the
    demo's env file sourced, $SPEC and WAVE filled in) against the demo's servers, after the
    UI test left them, on its shard ie-03: each ends as the runbook says, and the stores
    (read with SQL written here) show what the command did."""
    env, ctl = demo["env"], demo["env"]["MIGRATOR_CONTROL_DSN"]
    # the demo's spec with the retention at 0, so that the purge block can purge
    spec = tmp_path / "spec.yaml"
    spec.write_text(Path(env["MIGRATOR_DEMO_SPEC"]).read_text().replace("  after: 7d\n", "  after: 0s\n"))
    venv_bin = str(Path(sys.executable).parent)

    def shell(cmd: str) -> subprocess.CompletedProcess:
        script = f"source {demo['env_file']} && export PATH={venv_bin}:$PATH SPEC={spec} && cd {tmp_path} && {cmd}"
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600)

    def state() -> str:
        return _sql(ctl, "SELECT state FROM migrator.shard WHERE name = 'ie-03' AND wave = %s", (wave,))[0][0]

    def homes() -> set[str]:
        q = "SELECT DISTINCT d.home FROM migrator.directory d JOIN migrator.shard_user su ON su.user_key = d.user_key "
        return {h for (h,) in _sql(ctl, q + "WHERE su.shard_id = %s", (f"{wave}/ie-03",))}

    waves = []
    if _sql(ctl, "SELECT to_regclass('migrator.shard')")[0][0]:
        waves = _sql(ctl, "SELECT wave FROM migrator.shard WHERE name = 'ie-03' AND state = 'cut_over' ORDER BY wave")
    if not waves:  # on its own, without the UI test before it: a wave of its own
        assert shell("migrator run --config $SPEC --wave runbook").returncode == 0
        waves = [("runbook",)]
    wave = waves[0][0]
    # what a command may end with, where the runbook's section assumes an earlier state
    # than the shard is in here: refused, naming the state and the next step
    refused = {'--shard ie-03 --reason "INC-123': "is cut_over, so it cannot retry; next:"}
    ran = 0
    for title, commands in _runbook_sections():
        if title.startswith("Purging"):  # the shard moved again after the hold's `retry`
            assert shell(f"migrator run --config $SPEC --wave {wave} --shard ie-03").returncode == 0
            assert state() == "cut_over"
        for cmd in commands:
            res = shell(cmd.replace("WAVE", wave))
            ran += 1
            out = " ".join((res.stdout + res.stderr).split())  # as read, whatever the terminal wrapped
            assert "Traceback" not in out, (cmd, out[-2000:])
            why = next((v for k, v in refused.items() if k in cmd), None)
            if why:
                assert res.returncode == 1 and why in out, (cmd, out[-2000:])
                continue
            assert res.returncode == 0, (cmd, out[-2000:])
            if cmd.endswith("--dry-run"):
                assert ("dry run" in out or '"dry_run": true' in out) and state() == "cut_over", out[-2000:]
            if "status" in cmd and "--json" in cmd:
                assert json.loads(res.stdout)["shards"][0]["state"] == "cut_over"
            if cmd.startswith("migrator rollback") and "--dry-run" not in cmd:
                assert state() == "rolled_back" and homes() == {"us"}
            if cmd.startswith("migrator release"):
                assert state() == "rolled_back"
            if cmd.startswith("migrator retry") and "INC-124" in cmd:
                assert state() == "planned"
            if cmd.startswith("migrator purge") and "--dry-run" not in cmd:
                assert state() == "purged" and homes() == {"ie"}
            if cmd.startswith("migrator audit"):
                assert (tmp_path / "audit.html").stat().st_size > 0 and any((tmp_path / "records").iterdir())
    assert ran == sum(len(c) for _, c in _runbook_sections()) >= 15


def test_the_residency_view_shows_every_shard_and_acts_on_one(demo):
    """The plugin's page under the UI: every wave's shards with the state the control
    database holds, users homed per region; an empty reason is refused; a rollback started
    from a shard's row rolls back exactly that shard, as the operator; a retry from its row
    cuts it over again (through the migration run the retry starts); a release frees a
    held shard's users and runs nothing."""
    api, ctl = _api(demo), demo["env"]["MIGRATOR_CONTROL_DSN"]
    plugins = api.api("GET", "/plugins")["plugins"]
    (ours,) = [p for p in plugins if p["name"] == "residency"]
    assert [v["name"] for v in ours["external_views"]] == ["Residency"]
    # not for anyone who has not signed in
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{demo['url']}/residency/", timeout=30)
    assert denied.value.code in (401, 403)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _login(page, demo)
        _goto(page, f"{demo['url']}/residency/")
        homes = dict(_sql(ctl, "SELECT home, count(*) FROM migrator.directory GROUP BY home"))
        shown = {
            r.locator("td").nth(0).inner_text(): int(r.locator("td").nth(1).inner_text())
            for r in page.locator("#homes tr").all()[1:]
        }
        assert shown == homes
        held = {s for (s,) in _sql(ctl, "SELECT DISTINCT shard_id FROM migrator.held_users")}
        for sid, wave, name, state, region in _sql(
            ctl, "SELECT shard_id, wave, name, state, region FROM migrator.shard"
        ):
            row = page.locator(f"table.wave[data-wave='{wave}'] tr[data-shard='{name}']")
            cells = row.locator("td")
            want = state + ((" (held)" if sid in held else " (released)") if state == "rolled_back" else "")
            assert cells.nth(2).inner_text() == want, (sid, cells.nth(2).inner_text())
            assert cells.nth(1).inner_text() == f"us→{region}"
        page.screenshot(path=str(OUT / "ui-residency.png"))

        wave, name = _sql(
            ctl, "SELECT wave, name FROM migrator.shard WHERE state = 'cut_over' ORDER BY updated_at DESC LIMIT 1"
        )[0]
        row = page.locator(f"table.wave[data-wave='{wave}'] tr[data-shard='{name}']")
        answers = iter(["", "ticket 99: from the view", "ticket 99: again", "ticket 99: released"])
        page.on("dialog", lambda d: d.accept(next(answers)))
        row.get_by_role("button", name="roll back").click()
        page.get_by_text("a reason is needed").wait_for(timeout=10000)
        row.get_by_role("button", name="roll back").click()
        said = page.locator("#said")
        said.filter(has_text="started").wait_for(timeout=30000)
        run = said.inner_text().split("run ", 1)[1].split(" started")[0]
        assert _finished(api, "residency_rollback", run) == "success"
        assert (
            api.api("GET", f"/dags/residency_rollback/dagRuns/{urllib.parse.quote(run)}")["triggering_user_name"]
            == demo["user"]
        )
        sid = f"{wave}/{name}"
        assert _sql(ctl, "SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("rolled_back",)]
        assert (
            _sql(
                ctl,
                "SELECT count(*) FROM migrator.audit WHERE shard_id = %s "
                "AND detail->>'reason' = 'ticket 99: from the view'",
                (sid,),
            )[0][0]
            >= 1
        )
        # retry from its row: planned again and run by a migration run the retry starts
        _goto(page, f"{demo['url']}/residency/")
        row = page.locator(f"table.wave[data-wave='{wave}'] tr[data-shard='{name}']")
        assert row.locator("td").nth(2).inner_text() == "rolled_back (held)"
        row.get_by_role("button", name="retry").click()
        said = page.locator("#said")
        said.filter(has_text="started").wait_for(timeout=30000)
        run = said.inner_text().split("run ", 1)[1].split(" started")[0]
        assert _finished(api, "residency_release", run) == "success"
        started = [r for r in api.runs("residency_migration") if (r.get("conf") or {}).get("shards") == [sid]]
        assert len(started) == 1, [r.get("conf") for r in api.runs("residency_migration")]
        again = started[0]["dag_run_id"]
        assert _finished(api, "residency_migration", again) == "success"
        note = api.api("GET", f"/dags/residency_migration/dagRuns/{urllib.parse.quote(again)}")["note"]
        assert note == f"wave {wave}", note
        assert _sql(ctl, "SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("cut_over",)]
        region = _sql(ctl, "SELECT region FROM migrator.shard WHERE shard_id = %s", (sid,))[0][0]
        homes = _sql(
            ctl,
            "SELECT DISTINCT d.home FROM migrator.directory d JOIN migrator.shard_user u "
            "ON u.user_key = d.user_key WHERE u.shard_id = %s",
            (sid,),
        )
        assert homes == [(region,)], homes

        # release from the row of a shard whose users are still held (the first test's rejection)
        held_sid, held_wave, held_name = _sql(
            ctl,
            "SELECT s.shard_id, s.wave, s.name FROM migrator.shard s WHERE s.state = 'rolled_back' "
            "AND EXISTS (SELECT 1 FROM migrator.held_users h WHERE h.shard_id = s.shard_id) LIMIT 1",
        )[0]
        _goto(page, f"{demo['url']}/residency/")
        row = page.locator(f"table.wave[data-wave='{held_wave}'] tr[data-shard='{held_name}']")
        row.get_by_role("button", name="release").click()
        said = page.locator("#said")
        said.filter(has_text="started").wait_for(timeout=30000)
        run = said.inner_text().split("run ", 1)[1].split(" started")[0]
        assert _finished(api, "residency_release", run) == "success"
        assert _sql(ctl, "SELECT count(*) FROM migrator.held_users WHERE shard_id = %s", (held_sid,)) == [(0,)]
        assert not [r for r in api.runs("residency_migration") if (r.get("conf") or {}).get("shards") == [held_sid]]

        # the audit DAG keeps its report where the view links to it, whatever its verdict
        audit_run = api.api("POST", "/dags/residency_audit/dagRuns", {"logical_date": None})["dag_run_id"]
        state = _finished(api, "residency_audit", audit_run)
        _goto(page, f"{demo['url']}/residency/")
        line = page.locator("#audit").inner_text()
        assert ("Latest audit: ok" in line) == (state == "success"), (state, line)
        _goto(page, f"{demo['url']}/residency/audit")
        status = page.locator("#status").inner_text()
        assert status == "all checks passed" if state == "success" else "finding(s)" in status, (state, status)
        browser.close()
