"""The verbs that move shards: plan, run, each phase by name, status and recover."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer

from migrator.capture import recovery
from migrator.cli.common import (
    DEFAULT_WAVE,
    Config,
    DryRun,
    From,
    Json,
    Pick,
    Reason,
    Region,
    RunId,
    Shards,
    Since,
    Strict,
    Until,
    Wave,
    app,
    check_range,
    context_of,
    err,
    finish,
    moving_from,
    progress_bar,
)
from migrator.lifecycle import dispatch, engine, report
from migrator.phases.plan import plan as make_plan


@app.command()
def plan(
    config: Config,
    wave: Wave = None,
    region: Region = None,
    since: Since = None,
    until: Until = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
    strict: Strict = False,
) -> None:
    """Form the wave's shards: users, rows per table and bytes per shard."""
    check_range(since, until)
    ctx = context_of(config, run_id)
    regions = [region] if region else None
    if wave is None:  # the default line: its latest wave, or the next once users wait to move
        waves = engine.line(ctx, DEFAULT_WAVE)
        wave = engine.next_wave(ctx, DEFAULT_WAVE, region, since, until, strict) or (
            waves[-1] if waves else DEFAULT_WAVE
        )
    p = make_plan(ctx, wave, since=since, until=until, regions=regions, dry_run=dry_run, strict=strict)
    shards = [s.summary() for s in p.shards]
    if not dry_run:  # the shards as recorded now: their states, progress and estimates
        shards = report.shard_rows(ctx, wave, region=region)
    finish(report.document("plan", shards, plan=p, extra={"dry_run": dry_run}), json)


@app.command()
def run(
    config: Config,
    wave: Wave = None,
    shard: Shards = None,
    region: Region = None,
    since: Since = None,
    until: Until = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
    strict: Strict = False,
) -> None:
    """Plan (if needed), then copy, verify and cut over every selected shard. Given no wave:
    the latest of the default line, then the next one if users wait to move once it settled
    (a user who moved since, a country remapped), so a rerun keeps residency true."""
    check_range(since, until)
    ctx = context_of(config, run_id)
    line = None if wave is not None or shard else engine.line(ctx, DEFAULT_WAVE)
    waves = [wave or (line[-1] if line else DEFAULT_WAVE)]
    if dry_run:
        if line is not None:
            waves = [engine.next_wave(ctx, DEFAULT_WAVE, region, since, until, strict) or waves[0]]
        regions = [region] if region else None
        p = make_plan(ctx, waves[0], since=since, until=until, regions=regions, dry_run=True, strict=strict)
        shards = [s.summary() for s in p.shards if not shard or s.name in shard or s.shard_id in shard]
        finish(report.document("run", shards, plan=p, extra={"dry_run": True}), json)
    bar, cb = progress_bar(json)
    outcomes: list[engine.Outcome] = []
    with bar or contextlib.nullcontext():
        while True:
            p, done = engine.run(
                ctx, waves[-1], names=shard, region=region, since=since, until=until, progress=cb, strict=strict
            )
            outcomes += done
            if line is None or len(waves) > 1:
                break
            nxt = engine.next_wave(ctx, DEFAULT_WAVE, region, since, until, strict)
            if nxt is None:
                break
            waves.append(nxt)
    rows = [r for w in waves for r in report.shard_rows(ctx, w, shard, region)]
    finish(report.document("run", rows, outcomes, p), json)


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
    origin: str | None = None,
) -> None:
    ctx = context_of(config, run_id)
    selected = moving_from(ctx, ctx.control.resolve(wave, shard, region), origin)
    ids = [s.shard_id for s in selected]
    if not selected:
        note = (
            f"nothing planned in wave {wave or 'default'!r}"
            + (f" for region {region}" if region else "")
            + (f" from region {origin}" if origin else "")
            + ": run `migrator plan` first"
        )
        if not as_json:
            err.print(note)
        finish(report.document(phase, [], extra={"note": note}), as_json)
    rows = report.shard_rows(ctx, None, ids)
    if dry_run:  # the dispatcher's answer for each shard, nothing run
        would = {s.shard_id: dispatch.preview(ctx, s.shard_id, phase) for s in selected}
        for r in rows:
            r["would"], r["why"] = would[r["shard_id"]]["would"], would[r["shard_id"]]["why"]
        finish(report.document(phase, rows, extra={"dry_run": True, "phase": phase}), as_json)
    if phase in ("copy", "verify", "recheck", "cutover"):
        ctx.preflight({s.region for s in selected})  # spec problems exit 2 before anything is written
    outcomes = engine.one_phase(ctx, selected, phase, reason)
    finish(report.document(phase, report.shard_rows(ctx, None, ids), outcomes), as_json)


@app.command()
def copy(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Copy (or resume copying) planned shards in checkpointed batches."""
    _phase_command("copy", config, wave, shard, region, dry_run, json, run_id, origin=origin)


@app.command()
def verify(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
    recheck: Annotated[bool, typer.Option("--recheck", help="compare a verified or cut-over shard again")] = False,
) -> None:
    """Compare each shard's rows at source and destination; name any rows that differ."""
    _phase_command(
        "recheck" if recheck else "verify", config, wave, shard, region, dry_run, json, run_id, origin=origin
    )


@app.command()
def cutover(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Flip the ownership directory of verified shards to their region."""
    _phase_command("cutover", config, wave, shard, region, dry_run, json, run_id, origin=origin)


@app.command()
def rollback(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    reason: Reason = "",
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Undo shards: directory back to the source (if cut over), destination rows removed."""
    _phase_command("rollback", config, wave, shard, region, dry_run, json, run_id, reason, origin=origin)


@app.command()
def cleanup(
    config: Config,
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Remove change capture of finished shards (a cut-over shard can then no longer be rolled back)."""
    _phase_command("cleanup", config, wave, shard, region, dry_run, json, run_id, origin=origin)


@app.command()
def release(
    config: Config,
    reason: Reason = "",
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Free the held users of rolled-back shards, so a later wave may plan them."""
    _phase_command("release", config, wave, shard, region, dry_run, json, run_id, reason, origin=origin)


@app.command()
def retry(
    config: Config,
    reason: Reason = "",
    wave: Pick = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    dry_run: DryRun = False,
    json: Json = False,
    run_id: RunId = None,
) -> None:
    """Move the held users of rolled-back shards again, in their own wave (then `migrator run`)."""
    _phase_command("retry", config, wave, shard, region, dry_run, json, run_id, reason, origin=origin)


@app.command()
def status(
    config: Config,
    wave: Annotated[str | None, typer.Option("--wave")] = None,
    shard: Shards = None,
    region: Region = None,
    origin: From = None,
    json: Json = False,
) -> None:
    """Each shard's phase, progress, rows and digest."""
    ctx = context_of(config, None)
    if shard:
        ctx.control.resolve(wave, shard, region)  # a name that matches no shard: exit 2, named
    selected = moving_from(ctx, engine.select(ctx, wave, shard, region), origin)
    ids = {s.shard_id for s in selected}
    rows = [r for r in report.shard_rows(ctx, wave, shard, region) if r["shard_id"] in ids]
    due = {u.shard_id: u.due for u in recovery.unfinished(ctx, selected)}
    for r in rows:
        if r["shard_id"] in due:
            r["unfinished"] = due[r["shard_id"]]
    finish(report.document("status", rows, extra={"unfinished": len(due)}), json)


@app.command()
def recover(
    config: Config,
    watch: Annotated[float, typer.Option("--watch", help="keep sweeping every this many seconds (0: once)", min=0)] = 0,
    json: Json = False,
) -> None:
    """Finish or undo what a killed cutover or rollback left half done (every command does
    this first for its own shards; this does it for all, once or on a timer). Exits 1
    while a shard is left unfinished (its worker, or a lost worker's session for up to
    changes.dead_session_s, still holds it)."""
    ctx = context_of(config, None)
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
            # not done while a shard stays unfinished: a runbook's loop runs it again
            raise typer.Exit(1 if left else 0)
        time.sleep(watch)
