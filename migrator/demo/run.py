"""`migrator demo`: the whole job on throwaway servers, no database to install."""

from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from migrator.control.context import Context
from migrator.control.state import MOVED
from migrator.demo import seed
from migrator.demo.airflow_run import run_dag
from migrator.demo.embedded import Cluster, LocalS3
from migrator.demo.workload import Writer, check
from migrator.evidence import audit as audit_checks
from migrator.evidence import manifest as evidence
from migrator.lifecycle import engine, report
from migrator.phases import purge as purge_shards
from migrator.phases.residency import residencies
from migrator.spec import load_spec

REGIONS = ["us", "ie", "no"]


def write_spec(folder: Path, purge: bool = False, retention: str | None = None) -> Path:
    """The demo's spec; `purge` (the `--purge` demo) or `retention` set the purge's retention
    (7d otherwise). A retention the spec does not take is refused when the spec is read."""
    path = folder / "spec.yaml"
    text = resources.files("migrator.demo").joinpath("spec.yaml").read_text()
    after = "0s" if purge else retention
    if after is not None:
        text = text.replace("  after: 7d\n", f"  after: {json.dumps(after)}\n")
    path.write_text(text)
    return path


def start(
    users: int,
    base: Path,
    pg_ports: dict[str, int] | None = None,
    s3_ports: dict[str, int] | None = None,
    detach: bool = False,
) -> tuple[Cluster, dict[str, LocalS3], dict[str, str]]:
    """PostgreSQL and S3 endpoints for us, ie and no (on these ports, or free ones); the
    schema everywhere; the US seeded with rows and objects; the spec's environment
    variables set. Detached S3 endpoints outlive this process."""
    cluster = Cluster(REGIONS, base / "servers", ports=pg_ports).start()
    endpoints: dict[str, LocalS3] = {}
    try:  # a start that fails leaves nothing running
        for r in REGIONS:
            endpoints[r] = LocalS3(r, (s3_ports or {}).get(r)).start(detach=detach)
    except BaseException:
        for e in endpoints.values():
            e.stop()
        cluster.stop()
        raise
    # long enough for Airflow to mask them in task logs (it skips secrets under 5 characters, and says so)
    env = {"AWS_ACCESS_KEY_ID": "demo-access-key", "AWS_SECRET_ACCESS_KEY": "demo-secret-access-key"}
    for r in ("ie", "no"):  # each destination's keys, made up for this demo and never shown
        env[f"MIGRATOR_PSEUDONYM_KEY_{r.upper()}"] = secrets.token_hex(32)
        env[f"MIGRATOR_EVIDENCE_PSEUDONYM_{r.upper()}"] = secrets.token_hex(32)
        signing = env[f"MIGRATOR_EVIDENCE_SIGNING_{r.upper()}"] = secrets.token_hex(32)
        env[f"MIGRATOR_EVIDENCE_PUBLIC_{r.upper()}"] = evidence.public_key(signing)
    for r, s in endpoints.items():
        env[f"MIGRATOR_{r.upper()}_S3"] = s.endpoint
    for r in REGIONS:
        dsn = cluster[r].create_database("app")
        seed.create_schema(dsn)
        env[f"MIGRATOR_{r.upper()}_DSN"] = dsn
    env["MIGRATOR_CONTROL_DSN"] = cluster["us"].create_database("migrator_control")
    seed.seed(env["MIGRATOR_US_DSN"], users)
    os.environ.update(env)
    import boto3

    for r in ("ie", "no"):
        boto3.client("s3", endpoint_url=endpoints[r].endpoint, region_name="us-east-1").create_bucket(
            Bucket=f"media-{r}"
        )
    seed.seed_objects(endpoints["us"].endpoint, "media-us", env["MIGRATOR_US_DSN"])
    return cluster, endpoints, env


def _airflow_available() -> bool:
    try:
        import airflow.sdk  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the engine directly
        return False
    return True


def _start_writer(env: dict[str, str]):
    import psycopg

    with psycopg.connect(env["MIGRATOR_US_DSN"]) as c:
        sample = [u for (u,) in c.execute("SELECT user_id FROM users WHERE user_id % 7 = 0 ORDER BY user_id LIMIT 300")]
    dsn = {r: env[f"MIGRATOR_{r.upper()}_DSN"] for r in REGIONS}
    return Writer(dsn, env["MIGRATOR_CONTROL_DSN"], sample).start()


def _finish_writer(writer, env: dict[str, str]) -> dict:
    acked = writer.stop()
    out = {
        "acknowledged_writes": acked.ops,
        "fenced_retries": acked.fenced,
        "rerouted": acked.rerouted,
        "errors": len(writer.errors),
    }
    try:
        check({r: env[f"MIGRATOR_{r.upper()}_DSN"] for r in REGIONS}, env["MIGRATOR_CONTROL_DSN"], acked)
        out["lost_writes"] = 0
    except AssertionError as e:
        out["lost_writes"] = 1
        out["first_loss"] = str(e)[:200]
    return out


def run_demo(
    users: int = 2000,
    keep: Path | None = None,
    via: str = "auto",
    quiet: bool = False,
    with_writes: bool = False,
    purge: bool = False,
) -> dict:
    console = Console(stderr=True, quiet=quiet)
    base = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="rm-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    console.print(f"Starting PostgreSQL servers for {', '.join(REGIONS)} under {base} ...")
    cluster, endpoints, env = start(users, base)
    try:
        spec_path = write_spec(base, purge=purge)
        console.print(f"Seeded {users} US users; spec at {spec_path}")
        if via == "auto":
            via = "airflow" if _airflow_available() else "cli"
        ctx = Context(load_spec(spec_path), run_id="demo")
        extra = {"via": via, "users_seeded": users}
        writer = _start_writer(env) if with_writes else None
        if writer:
            console.print("An application is writing to 300 users throughout (routed by the directory) ...")
        if via == "airflow":
            console.print("Running the residency_migration DAG (airflow dags test) ...")
            res = run_dag(spec_path, base, progress=lambda: console.print(_progress_line(ctx)))
            extra["airflow_run_ok"] = res.returncode == 0
            if keep:
                extra["airflow_home"] = str(base / "airflow")
            shards = report.shard_rows(ctx, None)
            outcomes = [
                engine.Outcome(s["shard_id"], s["state"] == "cut_over" and res.returncode == 0, s["state"])
                for s in shards
            ] or [engine.Outcome("dag", False, error="the DAG planned no shard")]
        else:
            console.print("Running every shard: plan, copy, verify, cutover ...")
            _, outcomes = engine.run(ctx, "default")
            shards = report.shard_rows(ctx, "default")
        if writer:
            writes = extra["writes"] = _finish_writer(writer, env)
            ok_writes = writes["lost_writes"] == 0 and writes["errors"] == 0
            outcomes.append(engine.Outcome("writes", ok_writes, error=None if ok_writes else "writes were lost"))
        if purge:
            outcomes = [o for o in outcomes if o.shard_id == "writes"] + _purge(ctx, spec_path, base, via, console)
            shards = report.shard_rows(ctx, None)
            extra["purge"] = purge_shards.summary(ctx, [s["shard_id"] for s in shards])
        checked = extra["audit"] = audit_checks.run(ctx)  # what an independent monitor would check, reading only
        outcomes.append(
            engine.Outcome("audit", checked["ok"], error=None if checked["ok"] else "the audit found drift")
        )
        unplaced, staying, _ = residencies(ctx)
        extra.update(unplaced_users=unplaced, staying_users=staying)
        doc = report.document("demo", shards, outcomes, None, extra=extra)
        doc["seconds"] = round(time.monotonic() - t0, 2)
        doc["regions"] = _per_region(shards)
        doc["digests_matched"] = sum(1 for s in shards if s["digest"] and s["state"] in MOVED)
        if keep:
            doc["spec"] = str(spec_path)
        return doc
    finally:
        for s in endpoints.values():
            s.stop()
        if keep:
            cluster.stop()
            console.print(f"Servers stopped; their files are kept under {base}")
        else:
            cluster.remove()
            shutil.rmtree(base, ignore_errors=True)


def _purge(ctx: Context, spec_path: Path, base: Path, via: str, console: Console) -> list[engine.Outcome]:
    """The purge after the migration: the residency_purge DAG, or the library directly."""
    if via == "airflow":
        console.print("Running the residency_purge DAG (airflow dags test) ...")
        ok = run_dag(spec_path, base / "purge", {}, dag_id="residency_purge").returncode == 0
    else:
        console.print("Purging the source copy of every cut-over shard ...")
        ok = report.purge_document(ctx, purge_shards.select(ctx, None, None, None))["ok"]
    states = {s.shard_id: s.state.value for s in ctx.control.shards()}
    return [engine.Outcome(sid, ok and st == "purged", st) for sid, st in states.items()]


def _progress_line(ctx: Context) -> str:
    """One line of the shards' states while the DAG runs (nothing planned yet: says so)."""
    try:
        shards = ctx.control.shards() if ctx.control.exists() else []
    except Exception:
        return "  ... (the control database is not answering yet)"
    if not shards:
        return "  ... planning"
    states = collections.Counter(s.state.value for s in shards)
    done = states.get("cut_over", 0)
    rest = ", ".join(f"{k}: {v}" for k, v in sorted(states.items()) if k != "cut_over")
    return f"  ... {done}/{len(shards)} shards cut over" + (f" ({rest})" if rest else "")


def _per_region(shards: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for s in shards:
        r = out.setdefault(s["region"], {"users": 0, "rows": {}, "shards": 0, "cut_over": 0})
        r["users"] += s["users"]
        r["shards"] += 1
        r["cut_over"] += s["state"] in MOVED
        for t, n in s["rows"].items():
            r["rows"][t] = r["rows"].get(t, 0) + n
    return out
