"""docker-compose.yml cannot be started here (no Docker engine); check what can be checked."""

from __future__ import annotations

import json
import re

import yaml

from tests.conftest import ROOT


def test_compose_names_every_service_and_wires_the_connections():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    for name in [
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker-ie",
        "airflow-worker-no",
        "airflow-init",
        "airflow-db",
        "redis",
        "store-us",
        "store-ie",
        "store-no",
        "minio",
    ]:
        assert name in services, name
    env = services["airflow-scheduler"]["environment"]
    spec = yaml.safe_load((ROOT / "spec.compose.yaml").read_text())
    stores = [*spec["regions"].values(), spec["control"]]
    wanted = {m for store in stores for m in re.findall(r"^conn:(\w+)$", store["dsn"])}
    assert wanted == {"migrator_us", "migrator_ie", "migrator_no", "migrator_control"}
    for conn in wanted:
        uri = env[f"AIRFLOW_CONN_{conn.upper()}"]
        host = re.search(r"@([\w-]+):", uri).group(1)
        assert host in services, f"{conn} points at {host}, not a service"
    for store in spec["objects"]["stores"].values():
        conn = json.loads(env["AIRFLOW_CONN_" + store["endpoint"].removeprefix("conn:").upper()])
        host = re.search(r"//([\w-]+):", conn["extra"]["endpoint_url"]).group(1)
        assert host in services
    assert env["MIGRATOR_SPEC"].endswith("spec.compose.yaml")
    assert "migrator_source" in services["airflow-init"]["command"]
    mounts = services["airflow-scheduler"]["volumes"]
    assert "./dags:/opt/airflow/dags" in mounts


def test_compose_serves_each_destination_region_queue():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    spec = yaml.safe_load((ROOT / "spec.compose.yaml").read_text())
    destinations = {r for r in spec["policy"].values() if r != spec.get("source_region", "us")}
    served = {}
    for name, svc in services.items():
        m = re.search(r"celery worker --queues ([\w,]+)", str(svc.get("command", "")))
        if m:
            served[name] = set(m.group(1).split(","))
    assert destinations == {"ie", "no"}
    for region in destinations:  # the queue the DAG gives that region's shard tasks
        assert any(region in q and "default" in q for q in served.values()), (region, served)


def test_compose_shares_one_task_token_secret_taken_from_the_environment():
    """Unset, each Airflow process makes up its own secret and the api-server refuses the
    tokens the scheduler gave the workers' tasks; written in the file, it would be a secret
    in the repository."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    airflow = [svc for name, svc in services.items() if name.startswith("airflow-") and name != "airflow-db"]
    secrets = {svc["environment"].get("AIRFLOW__API_AUTH__JWT_SECRET") for svc in airflow}
    assert len(airflow) == 7 and len(secrets) == 1
    (secret,) = secrets
    # ${VAR:?message}: compose refuses to start with the variable unset or empty
    assert secret and re.fullmatch(r"\$\{AIRFLOW__API_AUTH__JWT_SECRET:\?[^}]+\}", secret), secret
