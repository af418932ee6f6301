"""A real Airflow for the demo, the tests and the benchmark: api-server, scheduler,
dag-processor and triggerer as separate processes over a PostgreSQL metadata database, with the
LocalExecutor or the CeleryExecutor (and then its workers, one process each, serving the
queues they are given).

Every process writes its log under the Airflow home (`<name>.log`) and its pid into
`<home>/pids`, so `stop_home` can end a detached set from another process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from migrator.demo.airflow_run import bin_path
from migrator.demo.embedded import free_port

POOL = ("migrator_source", 2, "copies against the source")  # name, slots, description


def jwt_secret() -> str:
    """A secret for the task API's tokens (HS512): 64 characters, the least Airflow's
    token library accepts without a warning for that algorithm."""
    return secrets.token_hex(32)


class RestClient:
    """Airflow's REST API as an operator's tool uses it: a token (from a simple-auth user, or
    none needed when every user is an admin), then JSON calls."""

    def __init__(self, base: str, credentials: tuple[str, str] | None = None):
        self.base, self.credentials, self.token = base, credentials, ""

    def login(self, timeout: float = 30) -> bool:
        """Get a token, waiting up to `timeout` for the api-server; whether it answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                body = None
                if self.credentials:
                    user, password = self.credentials
                    body = json.dumps({"username": user, "password": password}).encode()
                req = urllib.request.Request(
                    f"{self.base}/auth/token", data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=5) as r:
                    self.token = json.load(r)["access_token"]
                    return True
            time.sleep(1)
        return False

    def api(self, method: str, path: str, body: dict | None = None) -> Any:
        req = urllib.request.Request(
            f"{self.base}/api/v2{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                self.api("GET", f"/dags/{dag_id}")
                return
            time.sleep(2)
        raise RuntimeError(f"{dag_id} was never parsed")

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

    def run_state(self, dag_id: str, run_id: str, want: set[str], timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        run: dict = {}
        while time.monotonic() < deadline:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in want:
                return run
            time.sleep(1)
        raise RuntimeError(f"run {run_id} is {run.get('state')}, not {want}")

    def wait_runs(self, dag_id: str, count: int, timeout: float = 900) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.runs(dag_id)
            if len(runs) >= count and all(r["state"] in ("success", "failed") for r in runs):
                return runs
            time.sleep(3)
        raise RuntimeError(f"runs did not finish: {[(r['dag_run_id'], r['state']) for r in self.runs(dag_id)]}")

    def tasks(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=500")["task_instances"]


class AirflowServices(RestClient):
    def __init__(
        self,
        home: Path,
        env: dict[str, str],
        metadata_url: str,
        *,
        executor: str = "LocalExecutor",
        broker_url: str | None = None,
        port: int | None = None,
        parallelism: int = 8,  # LocalExecutor processes: a slot its last task still holds is not wanted
        credentials: tuple[str, str] | None = None,
        pool_slots: int | None = None,
        migrated: bool = False,
    ):
        """`credentials`: a user of the simple auth manager for the REST API; without them
        every user is an admin and no login is asked for. `migrated`: the metadata database
        is at Airflow's head with the source's pool already (a copy of one `migrate` made,
        see `migrate`), so neither is done again."""
        self.home, self.env, self.migrated = home, env, migrated
        self.pool_slots = POOL[1] if pool_slots is None else pool_slots
        self.port = port or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", credentials)
        self.env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": executor,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": metadata_url,  # psycopg 3 is async too
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": str(credentials is None),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
                "AIRFLOW__API__BASE_URL": self.base,
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API_AUTH__JWT_SECRET": env.get("AIRFLOW__API_AUTH__JWT_SECRET") or jwt_secret(),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                # Each DAG file is parsed again every 30 s by default, importing the migrator's
                # DAG module each time; changed and new files are still picked up on refresh.
                # Measured beside a scale-1 run: 0.8 CPU-s of the dag-processor's became 0.3.
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                # After a task ends, its supervisor can look for the process's exit a moment
                # before it happens, and then waits this long in a select with nothing left to
                # read before it reaps it: a worker slot held (5 s by default) after the task
                # is done. Measured: 4.4-5.0 s per such task at 5 s, about 1 s at 1 s; a
                # 4-shard run at scale 0.02 went from 9.2-10.2 s to 7.2 s (timed to a poll).
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            }
        )
        # A task's successor is queued on the scheduler's next loop; an idle scheduler sleeps
        # 1 s between loops by default. A quarter second measured 3.7 s instead of 6.5 s with
        # no task running over a 4-shard run (bench --airflow, scale 0.3).
        self.env.setdefault("AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME", "0.25")
        if broker_url:
            self.env["AIRFLOW__CELERY__BROKER_URL"] = broker_url
            self.env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + metadata_url
        self.procs: dict[str, subprocess.Popen] = {}

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [bin_path("airflow"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "a")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            [bin_path("airflow"), *args],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own session: stopped with every process it starts
        )
        log.close()
        self.procs[name] = proc
        with open(self.home / "pids", "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def migrate(self) -> None:
        """Airflow's metadata tables at their head, and the source's pool."""
        res = self.cli("db", "migrate")
        if res.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed: {res.stderr[-1500:]}")
        self.cli("pools", "set", POOL[0], str(self.pool_slots), POOL[2])

    def start(self) -> AirflowServices:
        if not self.migrated or self.pool_slots != POOL[1]:
            self.migrate()
        self.spawn("api-server", "api-server", "--port", str(self.port))
        self.spawn("scheduler", "scheduler")
        self.spawn("dag-processor", "dag-processor")
        # runs the deferred tasks' waits: an outage is waited out there, without a worker slot
        self.spawn("triggerer", "triggerer")
        if not self.login(timeout=180):
            raise RuntimeError(f"the api-server did not come up (see {self.home / 'api-server.log'})")
        return self

    def worker(
        self, name: str, queues: list[str], concurrency: int = 2, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """A Celery worker process serving `queues` (with `env` added to its environment)."""
        return self.spawn(
            name,
            "celery",
            "worker",
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(concurrency),
            "--celery-hostname",
            f"{name}@%h",
            "--without-mingle",
            "--without-gossip",
            env=env,
        )

    def stop(self) -> None:
        end_sessions([p.pid for p in self.procs.values()])
        for p in self.procs.values():
            p.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.home / "pids").unlink()


def _session(sid: int) -> list[int]:
    """The live processes of a session: a service and everything it started, including
    task processes that took process groups of their own."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
    return out


def end_sessions(sids: list[int], grace_s: float = 30) -> int:
    """SIGTERM every process of these sessions, SIGKILL what is left after the grace; how
    many sessions were running."""
    running = 0
    for sid in sids:
        pids = _session(sid)
        running += bool(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_session(sid) for sid in sids):
        time.sleep(0.3)
    for sid in sids:
        for pid in _session(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return running


def stop_home(home: Path) -> int:
    """End the sessions a detached set wrote into `<home>/pids`; how many were running."""
    try:
        pids = [int(x) for x in (home / "pids").read_text().split()]
    except FileNotFoundError:
        return 0
    running = end_sessions(pids)
    (home / "pids").unlink()
    return running
