"""The `migrator` command line: a thin layer over the library, for runbooks' manual reruns.

Exit status: 0 success, 1 a shard failed, 2 a usage or spec error.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from migrator import audit as audit_checks
from migrator import audit_report, chain, dispatch, engine, metrics, orchestration, recovery, report
from migrator import purge as purge_shards
from migrator.context import Context
from migrator.errors import MigratorError, SpecError, StateConflict, describe
from migrator.planner import plan as make_plan
from migrator.schema import history
from migrator.spec import load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Residency Migrator: move users' data by residency.")


@app.callback()
def _options(
    metrics_file: Annotated[
        Path | None,
        typer.Option(
            "--metrics-file",
            envvar="MIGRATOR_METRICS_FILE",
            help="write the run's metrics here at the end, as a Prometheus text file (node_exporter's textfile "
            "collector)",
        ),
    ] = None,
) -> None:
    if metrics_file is not None:
        os.environ["MIGRATOR_METRICS_FILE"] = str(metrics_file)


err = Console(stderr=True, soft_wrap=True)


def json_text(doc: dict) -> str:
    import json

    return json.dumps(doc, indent=2, default=str)


Config = Annotated[Path, typer.Option("--config", "-c", help="the spec file (YAML)")]
Shards = Annotated[list[str] | None, typer.Option("--shard", help="shard name (ie-03) or id; repeatable; default all")]
Region = Annotated[str | None, typer.Option("--region", help="only shards bound for this region")]
Wave = Annotated[str, typer.Option("--wave", help="the wave of shards (a planned set of users)")]
Pick = Annotated[
    str | None,
    typer.Option(
        "--wave",
        help="the wave of the shards (default: the wave of each --shard name, which must be unique; else 'default')",
    ),
]
Reason = Annotated[str, typer.Option("--reason", help="recorded in the audit trail")]
Strict = Annotated[bool, typer.Option("--strict", help="refuse to plan while an index the phases need is missing")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="show what would happen; write nothing")]
Json = Annotated[bool, typer.Option("--json", help="print one machine-readable JSON document")]
Since = Annotated[datetime | None, typer.Option("--since", help="only users created at or after this time")]
Until = Annotated[datetime | None, typer.Option("--until", help="only users created before this time")]
RunId = Annotated[str | None, typer.Option("--run-id", help="recorded in the audit trail")]


def _ctx(config: Path, run_id: str | None) -> Context:
    spec = load_spec(config)
    return Context(spec, run_id) if run_id else Context(spec)


def _finish(doc: dict, as_json: bool) -> None:
    report.emit(doc, as_json)
    raise typer.Exit(0 if doc["ok"] else 1)


def _progress(as_json: bool):
    if as_json or not sys.stderr.isatty():
        return None, None
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )
    tasks: dict[str, TaskID] = {}

    def cb(sid: str, done: int, total: int) -> None:
        if sid not in tasks:
            tasks[sid] = bar.add_task(f"copy {sid}", total=total)
        bar.update(tasks[sid], completed=done)

    return bar, cb


@app.command()
def plan(
    config: Config,
    wave: Wave = "default",
    region: Region = None,
    since: Since = None,
    until: Until = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
    strict: Strict = False,
) -> None:
    """Form the wave's shards: users, rows per table and bytes per shard."""
    ctx = _ctx(config, run_id)
    regions = [region] if region else None
    p = make_plan(ctx, wave, since=since, until=until, regions=regions, dry_run=dry_run, strict=strict)
    shards = [s.summary() for s in p.shards]
    if not dry_run:  # the shards as recorded now: their states, progress and estimates
        shards = report.shard_rows(ctx, wave, region=region)
    _finish(report.document("plan", shards, plan=p, extra={"dry_run": dry_run}), json)


@app.command()
def run(
    config: Config,
    wave: Wave = "default",
    shard: Shards = None,
    region: Region = None,
    since: Since = None,
    until: Until = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
    strict: Strict = False,
) -> None:
    """Plan (if needed), then copy, verify and cut over every selected shard."""
    ctx = _ctx(config, run_id)
    if dry_run:
        regions = [region] if region else None
        p = make_plan(ctx, wave, since=since, until=until, regions=regions, dry_run=True, strict=strict)
        shards = [s.summary() for s in p.shards if not shard or s.name in shard or s.shard_id in shard]
        _finish(report.document("run", shards, plan=p, extra={"dry_run": True}), json)
    bar, cb = _progress(json)
    if bar:
        with bar:
            p, outcomes = engine.run(
                ctx, wave, names=shard, region=region, since=since, until=until, progress=cb, strict=strict
            )
    else:
        p, outcomes = engine.run(ctx, wave, names=shard, region=region, since=since, until=until, strict=strict)
    _finish(report.document("run", report.shard_rows(ctx, wave, shard, region), outcomes, p), json)


def _phase_command(
    phase: str,
    config: Path,
    wave: str | None,
    shard: list[str] | None,
    region: str | None,
    dry_run: bool,
    as_json: bool,
    run_id: str | None,
    reason: str = "",
) -> None:
    ctx = _ctx(config, run_id)
    selected = ctx.control.resolve(wave, shard, region)
    ids = [s.shard_id for s in selected]
    if not selected:
        note = (
            f"nothing planned in wave {wave or 'default'!r}"
            + (f" for region {region}" if region else "")
            + ": run `migrator plan` first"
        )
        if not as_json:
            err.print(note)
        _finish(report.document(phase, [], extra={"note": note}), as_json)
    rows = report.shard_rows(ctx, None, ids)
    if dry_run:  # the dispatcher's answer for each shard, nothing run
        would = {s.shard_id: dispatch.preview(ctx, s.shard_id, phase) for s in selected}
        for r in rows:
            r["would"], r["why"] = would[r["shard_id"]]["would"], would[r["shard_id"]]["why"]
        _finish(report.document(phase, rows, extra={"dry_run": True, "phase": phase}), as_json)
    if phase in ("copy", "verify", "recheck", "cutover"):
        ctx.preflight({s.region for s in selected})  # spec problems exit 2 before anything is written
    outcomes = engine.one_phase(ctx, selected, phase, reason)
    _finish(report.document(phase, report.shard_rows(ctx, None, ids), outcomes), as_json)


@app.command()
def copy(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Copy (or resume copying) planned shards in checkpointed batches."""
    _phase_command("copy", config, wave, shard, region, dry_run, json, run_id)


@app.command()
def verify(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
    recheck: Annotated[bool, typer.Option("--recheck", help="compare a verified or cut-over shard again")] = False,
) -> None:
    """Compare each shard's rows at source and destination; name any rows that differ."""
    _phase_command("recheck" if recheck else "verify", config, wave, shard, region, dry_run, json, run_id)


@app.command()
def cutover(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Flip the ownership directory of verified shards to their region."""
    _phase_command("cutover", config, wave, shard, region, dry_run, json, run_id)


@app.command()
def rollback(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    reason: Reason = "",
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Undo shards: directory back to the source (if cut over), destination rows removed."""
    _phase_command("rollback", config, wave, shard, region, dry_run, json, run_id, reason)


@app.command()
def cleanup(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Remove change capture of finished shards (a cut-over shard can then no longer be rolled back)."""
    _phase_command("cleanup", config, wave, shard, region, dry_run, json, run_id)


@app.command()
def release(
    config: Config,
    reason: Reason = "",
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Free the held users of rolled-back shards, so a later wave may plan them."""
    _phase_command("release", config, wave, shard, region, dry_run, json, run_id, reason)


@app.command()
def retry(
    config: Config,
    reason: Reason = "",
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Move the held users of rolled-back shards again, in their own wave (then `migrator run`)."""
    _phase_command("retry", config, wave, shard, region, dry_run, json, run_id, reason)


@app.command()
def status(
    config: Config,
    wave: Annotated[str | None, typer.Option("--wave")] = None,
    shard: Shards = None,
    region: Region = None,
    json: Json = False,
) -> None:
    """Each shard's phase, progress, rows and digest."""
    ctx = _ctx(config, None)
    rows = report.shard_rows(ctx, wave, shard, region)
    due = {u.shard_id: u.due for u in recovery.unfinished(ctx, engine.select(ctx, wave, shard, region))}
    for r in rows:
        if r["shard_id"] in due:
            r["unfinished"] = due[r["shard_id"]]
    _finish(report.document("status", rows, extra={"unfinished": len(due)}), json)


@app.command()
def recover(
    config: Config,
    watch: Annotated[float, typer.Option("--watch", help="keep sweeping every this many seconds (0: once)", min=0)] = 0,
    json: Json = False,
) -> None:
    """Finish or undo what a killed cutover or rollback left half done (every command does
    this first for its own shards; this does it for all, once or on a timer)."""
    ctx = _ctx(config, None)
    while True:
        done = recovery.sweep(ctx)
        left = [u.__dict__ for u in recovery.unfinished(ctx)]
        doc = {"command": "recover", "ok": not left, "resolved": done, "unfinished": left}
        if not watch:
            if json:
                report.emit(doc, True)
            else:
                for sid, acts in done.items():
                    err.print(f"{sid}: {'; '.join(acts)}")
                for u in left:
                    err.print(f"[yellow]{u['shard_id']}[/]: {u['due']} (its worker still holds it)")
                if not done and not left:
                    err.print("nothing unfinished")
            raise typer.Exit(0)
        time.sleep(watch)


@app.command()
def purge(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what would be deleted and pseudonymised, per table; write nothing")
    ] = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Retire the source copy of cut-over shards past their retention: delete or pseudonymise
    their rows and delete their objects there (the point of no return: no rollback after)."""
    ctx = _ctx(config, run_id)
    doc = orchestration.purge_document(ctx, purge_shards.select(ctx, wave, shard, region), dry_run=dry_run)
    if not json and doc.get("note"):
        err.print(doc["note"])
    _finish(doc, json)


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
    ] = 55430,
    json: Json = False,
) -> None:
    """Start throwaway US, IE and NO servers, seed them, and migrate every shard."""
    from migrator.demo.run import run_demo

    if stop is not None or ui is not None:
        from migrator.demo import ui as ui_demo

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
        info = ui_demo.start_ui(ui, users=users, port_base=port_base)
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
    doc = run_demo(users=users, keep=keep, via=via, quiet=json, with_writes=with_writes, purge=purge)
    report.emit(doc, json)
    raise typer.Exit(0 if doc["ok"] else 1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (SpecError, StateConflict) as e:
        err.print(f"[red]error:[/] {e}")
        sys.exit(e.exit_code)
    except MigratorError as e:
        err.print(f"[red]error:[/] {e}")
        sys.exit(e.exit_code)
    except click.exceptions.UsageError as e:
        err.print(f"[red]usage:[/] {e.format_message()}")
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except Exception as e:  # a driver error: its class, never its text (which may quote a row)
        err.print(f"[red]error:[/] {describe(e)}")
        sys.exit(1)
    finally:
        try:
            metrics.write()
        except OSError as e:
            err.print(
                f"[red]error:[/] the metrics file {os.environ.get(metrics.FILE_ENV)} could not be written: "
                f"{e.strerror or describe(e)}"
            )


if __name__ == "__main__":
    main()
