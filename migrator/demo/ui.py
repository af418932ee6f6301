"""`migrator demo --ui DIR`: the demo's stores, seeded and not yet migrated, left running on
fixed loopback ports, with Airflow (api-server, scheduler, dag-processor, triggerer, LocalExecutor)
serving only this project's DAGs, unpaused, so an operator can drive the migration from
the UI. `migrator demo --stop DIR` ends it all.

Everything lives under DIR: the servers' files, the S3 endpoints' pids, the Airflow home
(its logs and metadata in the US server's `airflow` database), the spec, and `demo.env`
with every connection, key and setting, for `source DIR/demo.env` before running
`migrator` or `airflow` against the same stores by hand. The S3 endpoints (moto's server)
keep their objects in memory: they hold them while they run, until `--stop`.
"""

from __future__ import annotations

import json
import secrets
import shlex
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from migrator.demo.airflow_run import airflow_env, spec_for_airflow
from migrator.demo.airflow_services import AirflowServices, end_sessions, jwt_secret, stop_home
from migrator.demo.embedded import LocalPostgres
from migrator.demo.run import REGIONS, start, write_spec
from migrator.errors import SpecError
from migrator.spec.fields import DURATION

USER = "operator"


@dataclass
class Ports:
    """Where everything listens, from one base port: PostgreSQL at base+0..2 (us, ie, no),
    S3 at base+10..12, the Airflow UI at base+20."""

    base: int = 25430  # below the kernel's range for outgoing connections (32768 up by default)

    def postgres(self) -> dict[str, int]:
        return {r: self.base + i for i, r in enumerate(REGIONS)}

    def s3(self) -> dict[str, int]:
        return {r: self.base + 10 + i for i, r in enumerate(REGIONS)}

    @property
    def ui(self) -> int:
        return self.base + 20

    def taken(self) -> list[str]:
        """The ports already in use, each with what the demo would put there."""
        wanted = {
            **{p: f"PostgreSQL {r}" for r, p in self.postgres().items()},
            **{p: f"S3 endpoint {r}" for r, p in self.s3().items()},
            self.ui: "the Airflow UI",
        }
        out = []
        for port, what in wanted.items():
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    out.append(f"port {port} ({what})")
        return out


def _running(folder: Path) -> bool:
    return (folder / "airflow" / "pids").exists() or (folder / "s3.pids").exists()


def start_ui(folder: Path, users: int = 2000, port_base: int = 25430, retention: str | None = None) -> dict:
    """Start it all under `folder`; returns what to tell the operator (URL, login, files)."""
    if retention is not None and not DURATION.match(retention):  # before anything starts
        raise SpecError(f"--retention {retention!r} is not a duration such as 0s, 30m, 12h or 7d")
    folder = folder.resolve()
    if _running(folder):
        raise SpecError(f"a demo is already running under {folder}: `migrator demo --stop {folder}` ends it")
    ports = Ports(port_base)
    if taken := ports.taken():  # before anything starts: a failed start leaves nothing behind
        raise SpecError(f"cannot start the demo: {', '.join(taken)} in use; give another --port-base")
    folder.mkdir(parents=True, exist_ok=True)
    cluster, endpoints, env = start(users, folder, pg_ports=ports.postgres(), s3_ports=ports.s3(), detach=True)
    (folder / "s3.pids").write_text("".join(f"{s.proc.pid}\n" for s in endpoints.values() if s.proc))
    spec_path = write_spec(folder, retention=retention)
    home = folder / "airflow"
    home.mkdir(exist_ok=True)
    af_spec, conns = spec_for_airflow(spec_path, folder / "spec.airflow.yaml")
    password = secrets.token_urlsafe(12)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: password}))
    passwords.chmod(0o600)
    af_env = airflow_env(home, conns)
    af_env.update(env)  # the stores' keys and endpoints, as the workers of a deployment hold them
    af_env.update(
        {
            "MIGRATOR_SPEC": str(af_spec),
            "MIGRATOR_REPORTS_DIR": str(folder / "reports"),  # the audit DAG's reports, for the Residency view
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            # the scheduled DAGs' first intervals start now: nothing runs before the operator acts
            "MIGRATOR_START_DATE": datetime.now(UTC).isoformat(timespec="seconds"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret(),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
    )
    meta = cluster["us"].create_database("airflow").replace("postgresql://", "postgresql+psycopg://", 1)
    af = AirflowServices(home, af_env, meta, port=ports.ui, credentials=(USER, password)).start()
    for dag_id in ("residency_migration", "residency_rollback", "residency_release", "residency_purge"):
        af.wait_for_dag(dag_id)
    env_file = folder / "demo.env"
    exported = {**af.env, "MIGRATOR_DEMO_SPEC": str(spec_path)}
    env_file.write_text(
        "# the demo's stores, keys and Airflow settings: `source` this file before running\n"
        "# `migrator --config $MIGRATOR_DEMO_SPEC ...` or `airflow ...` by hand\n"
        + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(exported.items()) if _exported(k))
    )
    env_file.chmod(0o600)
    return {
        "url": af.base,
        "user": USER,
        "password": password,
        "env_file": str(env_file),
        "spec": str(spec_path),
        "postgres": {r: f"127.0.0.1:{p}" for r, p in ports.postgres().items()},
        "s3": {r: s.endpoint for r, s in endpoints.items()},
        "users_seeded": users,
        "stop": f"migrator demo --stop {folder}",
    }


def _exported(key: str) -> bool:
    return key.startswith(("AIRFLOW", "MIGRATOR_", "AWS_")) or key == "PATH"


def stop_ui(folder: Path) -> dict:
    """End what `start_ui` left running under `folder` (Airflow, S3 endpoints, PostgreSQL)."""
    folder = folder.resolve()
    if not folder.exists():
        raise SpecError(f"no demo under {folder}")
    airflow = stop_home(folder / "airflow")
    s3 = 0
    pids = folder / "s3.pids"
    if pids.exists():  # each endpoint was started in a session of its own
        s3 = end_sessions([int(x) for x in pids.read_text().split()])
        pids.unlink()
    servers = 0
    for r in REGIONS:
        if (folder / "servers" / r / "data" / "postmaster.pid").exists():
            LocalPostgres(r, folder / "servers").stop()
            servers += 1
    return {"stopped": {"airflow_processes": airflow, "s3_endpoints": s3, "postgres_servers": servers}}
