"""What the command line's verbs share: the app, its options, loading the spec, printing
the document and the exit status (0 success, 1 a shard failed, 2 a usage or spec error)."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from migrator.control.context import Context
from migrator.control.store import Shard
from migrator.errors import SpecError
from migrator.lifecycle import report
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
From = Annotated[
    str | None,
    typer.Option("--from", help="only shards whose users move from this region (the source, or a home they leave)"),
]
Wave = Annotated[
    str | None,
    typer.Option(
        "--wave",
        help="the wave of shards (a planned set of users); default: `default`, then the next of its line "
        "(default-2, ...) once it has settled and users wait to move",
    ),
]
DEFAULT_WAVE = "default"
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
Since = Annotated[
    datetime | None,
    typer.Option("--since", help="only users created (or, with root.updated_at, changed) at or after this time"),
]
Until = Annotated[
    datetime | None,
    typer.Option("--until", help="only users created (or, with root.updated_at, changed) before this time"),
]
RunId = Annotated[str | None, typer.Option("--run-id", help="recorded in the audit trail")]


def check_range(since: datetime | None, until: datetime | None) -> None:
    """`--since` after `--until` selects nobody: a mistake, refused before anything runs."""
    if since is not None and until is not None and since >= until:
        raise SpecError(f"--since ({since.isoformat()}) is not before --until ({until.isoformat()}): no user can match")


def context_of(config: Path, run_id: str | None) -> Context:
    spec = load_spec(config)
    return Context(spec, run_id) if run_id else Context(spec)


def finish(doc: dict, as_json: bool) -> None:
    report.emit(doc, as_json)
    raise typer.Exit(0 if doc["ok"] else 1)


def progress_bar(as_json: bool):
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


def moving_from(ctx: Context, shards: list[Shard], origin: str | None) -> list[Shard]:
    """The shards whose users move from `origin` (all of them when None); a region the spec
    does not have is a spec problem."""
    if origin is None:
        return shards
    if origin not in ctx.spec.regions:
        raise SpecError(f"--from {origin!r}: not a region of the spec ({', '.join(sorted(ctx.spec.regions))})")
    return [s for s in shards if ctx.origin(s) == origin]
