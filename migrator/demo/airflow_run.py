"""Runs the residency_migration DAG for the demo with `airflow dags test`, in an Airflow
home of its own (SQLite metadata), with the stores' DSNs passed as Airflow Connections."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from migrator.spec import read_yaml

DAGS = Path(__file__).resolve().parents[2] / "dags"
LOCAL_SETTINGS = Path(__file__).with_name("airflow_local_settings.py")
_migrated: Path | None = None  # a metadata database this process migrated, copied for the next home


def airflow_env(home: Path, conns: dict[str, str]) -> dict[str, str]:
    """The environment of an Airflow home of its own for the migrator's DAGs, with `conns`
    as Airflow Connections; the home gets the migrator's airflow_local_settings (what
    every task imports, imported before tasks fork)."""
    (home / "config").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LOCAL_SETTINGS, home / "config" / "airflow_local_settings.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("MIGRATOR_AIRFLOW_LOG_LEVEL", "WARNING"),
        }
    )
    for conn_id, uri in conns.items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = uri
    return env


def spec_for_airflow(spec_path: Path, out: Path) -> tuple[Path, dict[str, str]]:
    """The spec with each DSN and S3 endpoint replaced by an Airflow Connection, and those connections."""
    data = read_yaml(spec_path)
    conns = {}
    for region, store in data["regions"].items():
        conns[f"migrator_{region}"] = os.path.expandvars(store["dsn"])
        store["dsn"] = f"conn:migrator_{region}"
    conns["migrator_control"] = os.path.expandvars(data["control"]["dsn"])
    data["control"]["dsn"] = "conn:migrator_control"
    for region, store in ((data.get("objects") or {}).get("stores") or {}).items():
        conns[f"migrator_s3_{region}"] = json.dumps(
            {
                "conn_type": "aws",
                "login": os.environ.get("AWS_ACCESS_KEY_ID"),
                "password": os.environ.get("AWS_SECRET_ACCESS_KEY"),
                "extra": {"endpoint_url": os.path.expandvars(store["endpoint"])},
            }
        )
        store["endpoint"] = f"conn:migrator_s3_{region}"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out, conns


def _metadata(home: Path, env: dict[str, str]) -> None:
    """The home's SQLite metadata database, migrated and with the source's pool: the first
    in a process is made by Airflow's CLI (two processes of about 4 s each), and copied from
    it for every later home (a test runs several)."""
    global _migrated
    db = home / "airflow.db"
    if _migrated is not None and _migrated.exists():
        shutil.copyfile(_migrated, db)
        return
    subprocess.run([bin_path("airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run(
        [bin_path("airflow"), "pools", "set", "migrator_source", "2", "copies against the source"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    if db.exists():  # a copy taken before any DAG was parsed or run
        _migrated = home.parent / "airflow-migrated.db"
        shutil.copyfile(db, _migrated)


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_dag(
    spec_path: Path,
    base: Path,
    conf: dict | None = None,
    logical_date: str | None = None,
    progress: Callable[[], None] | None = None,
    every_s: float = 5.0,
    dag_id: str = "residency_migration",
) -> subprocess.CompletedProcess:
    """`airflow dags test` of a DAG (the migration's by default, scope=all unless `conf` says
    otherwise); `progress` is called every `every_s` while it runs."""
    home = base / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    af_spec, conns = spec_for_airflow(spec_path, base / "spec.airflow.yaml")
    env = airflow_env(home, conns)
    env["MIGRATOR_SPEC"] = str(af_spec)
    _metadata(home, env)
    conf = {**({"scope": "all"} if dag_id == "residency_migration" else {}), **(conf or {})}
    args = ["dags", "test", dag_id] + ([logical_date] if logical_date else []) + ["-c", json.dumps(conf)]
    log = base / "airflow-dags-test.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([bin_path("airflow"), *args], env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 1800
        while proc.poll() is None:
            try:
                proc.wait(every_s)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    break
                if progress is not None:
                    progress()
    text = log.read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, "")
