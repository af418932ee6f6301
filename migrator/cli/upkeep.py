"""The verbs around the moves: purge, audit, upgrade of the tool's tables, and the demo."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from migrator.cli.common import (
    Config,
    From,
    Json,
    Pick,
    Region,
    RunId,
    Shards,
    app,
    context_of,
    err,
    finish,
    json_text,
    moving_from,
)
from migrator.control.context import Context
from migrator.evidence import audit as audit_checks
from migrator.evidence import chain
from migrator.evidence import report as audit_report
from migrator.lifecycle import report
from migrator.phases import purge as purge_shards
from migrator.schema import history
from migrator.spec import load_spec


@app.command()
def purge(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what would be deleted and pseudonymised, per table; write nothing")
    ] = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Retire the copy cut-over shards left at their origin (the source, or the home a move
    again left) past their retention: delete or pseudonymise their rows and delete their
    objects there (the point of no return: no rollback after)."""
    ctx = context_of(config, run_id)
    selected = moving_from(ctx, purge_shards.select(ctx, wave, shard, region), origin)
    doc = report.purge_document(ctx, selected, dry_run=dry_run)
    if not json and doc.get("note"):
        err.print(doc["note"])
    finish(doc, json)


@app.command()
def audit(
    config: Config,
    html: Annotated[Path | None, typer.Option("--html", help="also write the report for people here")] = None,
    records: Annotated[Path | None, typer.Option("--records", help="write the records of processing here")] = None,
    since: Annotated[
        datetime | None, typer.Option("--since", help="recompute manifests' digests only for shards active since")
    ] = None,
    json: Json = False,
) -> None:
    """Check, reading only, the audit chain against the heads kept in each region, the signed
    manifests, and residency itself (stray rows, purged rows back at the source); exit 1 on
    any finding."""
    spec = load_spec(config)
    doc = audit_checks.run(Context(spec, "audit"), since=since)
    if html is not None:
        doc["html"] = str(audit_report.write_html(doc, html))
    if records is not None:
        doc["records"] = [str(p) for p in audit_report.write_records(doc, spec, records)]
    if json:
        report.emit(doc, True)
    else:
        for f in doc["findings"]:
            err.print(f"[red]{f['kind']}[/]: " + ", ".join(f"{k} {v}" for k, v in f.items() if k != "kind"))
        if doc["ok"]:
            err.print(f"audit ok: {doc.get('chain', {}).get('sealed', 0)} audit rows sealed and checked")
    raise typer.Exit(0 if doc["ok"] else 1)


@app.command()
def upgrade(
    config: Config,
    sql: Annotated[bool, typer.Option("--sql", help="print the SQL for a DBA; connect to nothing")] = False,
    json: Json = False,
) -> None:
    """Bring the migrator's own tables in every store of the spec to the newest schema
    revision (every command also does this on first use, under a lock)."""
    spec = load_spec(config)
    if sql:
        typer.echo(history.sql_all(spec))
        raise typer.Exit(0)
    ctx = Context(spec)  # names the stores in errors
    done = history.upgrade_all(spec)
    sealed = chain.seal(ctx.control)  # audit rows written before the chain existed join it now
    if json:
        report.emit({"command": "upgrade", "ok": True, "stores": done, "audit_rows_sealed": sealed}, True)
    else:
        for d in done:
            what = f"{d['from'] or 'none'} -> {d['to']}" if d["upgraded"] else f"at {d['to']}"
            err.print(f"{d['store']}: {d['history']} tables {what}")
    raise typer.Exit(0)


@app.command()
def demo(
    users: Annotated[int, typer.Option("--users", min=10, help="synthetic US users to seed")] = 2000,
    keep: Annotated[Path | None, typer.Option("--keep", help="keep the servers' files in this folder")] = None,
    via: Annotated[str, typer.Option("--via", help="'airflow' (the DAG), 'cli' (the engine), or 'auto'")] = "auto",
    with_writes: Annotated[bool, typer.Option("--with-writes", help="an application writing throughout")] = False,
    purge: Annotated[bool, typer.Option("--purge", help="then retire the US copy (retention 0 in the demo)")] = False,
    ui: Annotated[
        Path | None,
        typer.Option(
            "--ui",
            help="seed, then leave the stores and Airflow's UI running under this folder on fixed ports "
            "(migrate from the UI); `--stop` ends them",
        ),
    ] = None,
    stop: Annotated[Path | None, typer.Option("--stop", help="end the --ui demo running under this folder")] = None,
    port_base: Annotated[
        int, typer.Option("--port-base", min=1024, max=65000, help="--ui: PostgreSQL at +0..2, S3 +10..12, UI +20")
    ] = 25430,
    retention: Annotated[
        str | None,
        typer.Option("--retention", help="--ui: the purge's retention in the demo's spec (0s, 30m, 12h; default 7d)"),
    ] = None,
    json: Json = False,
) -> None:
    """Start throwaway US, IE and NO servers, seed them, and migrate every shard."""
    # the demo and its servers come with the [demo] extra, which a deployment leaves out
    from migrator.demo import run as demo_run
    from migrator.demo import ui as ui_demo

    if stop is not None or ui is not None:
        if stop is not None:
            stopped = ui_demo.stop_ui(stop)
            if json:
                print(json_text(stopped))
            else:
                err.print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in stopped["stopped"].items()))
            return
        assert ui is not None
        if not json:
            err.print(f"Starting the stores and Airflow under {ui} (a minute or two) ...")
        info = ui_demo.start_ui(ui, users=users, port_base=port_base, retention=retention)
        if json:
            print(json_text(info))
        else:
            err.print(
                f"Airflow UI: [bold]{info['url']}[/]  login: {info['user']} / {info['password']}\n"
                f"Stores and keys: source {info['env_file']}  (spec: {info['spec']})\n"
                f"PostgreSQL: {info['postgres']}  S3: {info['s3']}\n"
                f"Nothing is migrated yet: trigger residency_migration from the UI. End it all with: {info['stop']}"
            )
        return
    doc = demo_run.run_demo(users=users, keep=keep, via=via, quiet=json, with_writes=with_writes, purge=purge)
    report.emit(doc, json)
    raise typer.Exit(0 if doc["ok"] else 1)
