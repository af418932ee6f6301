"""What the command line prints: one JSON document, or rich tables for a person."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from migrator import capture, metrics, throttle
from migrator.control.context import Context
from migrator.control.store import Shard
from migrator.differences import records
from migrator.errors import ChecksumMismatch, PurgeRefused, StateConflict
from migrator.lifecycle import dispatch, engine
from migrator.lifecycle.engine import Outcome
from migrator.phases import purge_checks
from migrator.phases.plan import Plan


def shard_rows(ctx: Context, wave: str | None, names: list[str] | None = None, region: str | None = None) -> list[dict]:
    ctl = ctx.control
    if not ctl.exists():
        return []
    out = []
    with ctl.connect(autocommit=True) as c:
        has_objects = c.execute("SELECT to_regclass('migrator.object_checkpoint') IS NOT NULL").fetchone()[0]
    for s in ctl.shards(wave=wave, names=names, region=region):
        cps = ctl.checkpoints(s.shard_id)
        rows: dict[str, int] = {}
        for cp in cps.values():
            for t, n in cp.rows.items():
                rows[t] = rows.get(t, 0) + n
        object_bytes = None
        if has_objects:
            with ctl.connect(autocommit=True) as c:
                n, count, size = c.execute(
                    "SELECT count(*), coalesce(sum(objects), 0), coalesce(sum(bytes), 0) "
                    "FROM migrator.object_checkpoint WHERE shard_id = %s",
                    (s.shard_id,),
                ).fetchone()
            if n:
                rows["objects"], object_bytes = int(count), int(size)
        throttled = None
        if s.state.value in ("copying", "copied", "verified", "failed"):
            with ctl.connect(autocommit=True) as c:
                (throttled,) = c.execute(
                    "SELECT sum((detail->>'waited_s')::float) FROM migrator.audit "
                    "WHERE shard_id = %s AND detail->>'event' = ANY(%s)",
                    (s.shard_id, list(throttle.EVENTS)),
                ).fetchone()
        lag = None
        if ctx.spec.changes.capture and s.state.value in ("copying", "copied", "verified", "failed"):
            lag = capture.lag(ctx.origin_dsn(s), s.shard_id, ctl.position(s.shard_id, "forward"))
            if lag is not None:
                metrics.lag(s.shard_id, s.region, int(lag))
        out.append(
            {
                "lag": lag,
                "shard_id": s.shard_id,
                "wave": s.wave,
                "name": s.name,
                "region": s.region,
                "from": ctx.origin(s),  # the region its users move from
                "state": s.state.value,
                "users": s.users,
                "batches": s.batches,
                "batches_done": len(cps),
                "rows": rows or s.plan.get("rows", {}),
                "digest": s.digest,
                "approx_bytes": s.plan.get("approx_bytes", 0),
                "error": s.error,
                **({"object_bytes": object_bytes} if object_bytes is not None else {}),
                **({"throttled_s": round(throttled, 1)} if throttled else {}),
                **({"users_held": ctl.held(s.shard_id)[0]} if s.state.value == "rolled_back" else {}),
            }
        )
    return out


def document(
    command: str,
    shards: list[dict],
    outcomes: list[Outcome] | None = None,
    plan: Plan | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    by_id = {o.shard_id: o for o in outcomes or []}
    for s in shards:
        o = by_id.get(s["shard_id"])
        if o is not None:
            s["ok"] = o.ok
            if o.error:
                s["error"] = o.error
            if o.differences:
                s["differences"] = records(o.differences)
            if o.detail:
                s["phases"] = o.detail  # per phase: what it did, or why it was skipped
    totals: dict[str, Any] = {"shards": len(shards), "users": sum(s.get("users", 0) for s in shards), "rows": {}}
    for s in shards:
        for t, n in s.get("rows", {}).items():
            totals["rows"][t] = totals["rows"].get(t, 0) + n
    states: dict[str, int] = {}
    for s in shards:
        states[s.get("state", "planned")] = states.get(s.get("state", "planned"), 0) + 1
    totals["states"] = states
    doc: dict[str, Any] = {
        "command": command,
        "ok": all(o.ok for o in outcomes or []),
        "shards": shards,
        "totals": totals,
    }
    if plan is not None:
        doc["wave"] = plan.wave
        doc["unplaced_users"] = plan.unplaced
        doc["staying_users"] = plan.staying
        doc["already_planned"] = plan.already_planned
        doc["moves"] = plan.moves
        doc["warnings"] = plan.warnings
    if extra:
        doc.update(extra)
    return doc


def emit(doc: dict, as_json: bool, console: Console | None = None) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    if doc["command"] == "purge" and doc.get("dry_run"):
        _would_purge(doc, console)
        return
    shards = doc.get("shards", [])
    tables = sorted({t for s in shards for t in s.get("rows", {})})
    waves = sorted({s["wave"] for s in shards if s.get("wave")})
    wave = doc.get("wave") or (waves[0] if len(waves) == 1 else None)
    t = Table(title=f"migrator {doc['command']}" + (f" (wave {wave})" if wave else ""))
    show_lag = any(s.get("lag") is not None for s in shards)
    show_wave = len(waves) > 1  # shard names repeat across waves
    cols = [*(["wave"] if show_wave else []), "shard", "region", "state", "users", "batches"]
    cols += [f"{x} rows" for x in tables] + (["lag"] if show_lag else []) + ["digest"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("wave", "shard", "region", "state", "digest") else "right")
    for s in shards:
        batches = (
            f"{s.get('batches_done', '-')}/{s.get('batches', '-')}"
            if "batches_done" in s
            else str(s.get("batches", "-"))
        )
        state = s.get("state", "planned")
        style = {"cut_over": "green", "failed": "red", "rolled_back": "yellow"}.get(state, "")
        if "users_held" in s:  # a rolled-back shard's users: held out of later plans, or released
            state += " (held)" if s["users_held"] else " (released)"
        t.add_row(
            *([s.get("wave", "")] if show_wave else []),
            s["name"],
            f"{s['from']}→{s['region']}" if s.get("from") else s["region"],  # the move's pair
            f"[{style}]{state}[/]" if style else state,
            str(s.get("users", "")),
            batches,
            *[str(s.get("rows", {}).get(x, 0)) for x in tables],
            *([str(s.get("lag") if s.get("lag") is not None else "")] if show_lag else []),
            (s.get("digest") or "")[:12],
        )
    console.print(t)
    if doc.get("unplaced_users"):
        console.print(
            "Users left where they are (residency not placed by the policy): "
            + ", ".join(f"{k}: {v}" for k, v in sorted(doc["unplaced_users"].items()))
        )
    if doc.get("staying_users"):
        console.print(
            "Users who stay (the policy keeps them in their region): "
            + ", ".join(f"{k}: {v}" for k, v in sorted(doc["staying_users"].items()))
        )
    if doc.get("moves"):
        console.print("Moves: " + ", ".join(f"{k}: {v} user(s)" for k, v in doc["moves"].items()))
    for w in doc.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {w}")
    for s in shards:
        if s.get("unfinished"):
            console.print(
                f"[yellow]{s['shard_id']} unfinished[/]: {s['unfinished']} (the next command or "
                "`migrator recover` does it)"
            )
        if s.get("error"):
            console.print(f"[red]{s['shard_id']}[/]: {s['error']}")
    if doc.get("regions"):
        r = Table(title="per region")
        for col in ["region", "users", "shards cut over", *[f"{x} rows" for x in tables]]:
            r.add_column(col, justify="left" if col == "region" else "right")
        for name, v in sorted(doc["regions"].items()):
            r.add_row(
                name, str(v["users"]), f"{v['cut_over']}/{v['shards']}", *[str(v["rows"].get(x, 0)) for x in tables]
            )
        console.print(r)
        console.print(
            f"digests matched: {doc.get('digests_matched')} shard(s); "
            f"took {doc.get('seconds')} s (via {doc.get('via')})"
        )
    if doc.get("purge"):
        pg = doc["purge"]
        deleted = sum(v.get("rows_deleted", 0) for v in pg["tables"].values())
        pseudo = sum(v.get("rows_pseudonymised", 0) for v in pg["tables"].values())
        console.print(
            f"purged at the source: {pg['shards_purged']} shard(s), {deleted} rows deleted, "
            f"{pseudo} rows pseudonymised, {pg['objects_deleted']} objects deleted"
        )
    if doc.get("audit"):
        a = doc["audit"]
        manifests = sum(v.get("manifests", 0) for v in a.get("residency", {}).get("regions", {}).values())
        console.print(
            ("audit: all checks passed" if a["ok"] else f"[red]audit: {len(a['findings'])} finding(s)[/]")
            + f" ({a.get('chain', {}).get('sealed', 0)} audit rows in the chain, {manifests} signed manifests)"
        )
    if doc.get("writes"):
        w = doc["writes"]
        console.print(
            f"application writes during the migration: {w['acknowledged_writes']} acknowledged, "
            f"{w['fenced_retries']} fenced and retried, {w['lost_writes']} lost"
        )
    if doc.get("dry_run"):
        console.print("[yellow]dry run: nothing was written[/]")


def _would_purge(doc: dict, console: Console) -> None:
    """`migrator purge --dry-run`: per shard and table what would be deleted, pseudonymised
    or kept, the objects that would go, or why the shard would be refused."""
    t = Table(title="migrator purge --dry-run")
    for col in ("shard", "table", "action", "rows", "columns"):
        t.add_column(col, justify="right" if col == "rows" else "left")
    for s in doc["shards"]:
        if s.get("refused"):
            t.add_row(s["shard_id"], "", "[red]refused[/]", "", escape(s["refused"]))
            continue
        would = s["would_purge"]
        for name, v in would["tables"].items():
            t.add_row(s["shard_id"], name, v["action"], str(v["rows"]), ", ".join(v.get("columns", [])))
        t.add_row(s["shard_id"], "(objects)", "delete", str(would["objects"]), "", end_section=True)
    console.print(t)
    if not doc["shards"]:
        console.print("no shard is due for purging")
    console.print("[yellow]dry run: nothing was written[/]")


def purge_document(ctx: Context, shards: list[Shard], dry_run: bool = False) -> dict[str, Any]:
    """`migrator purge` and the residency_purge DAG: each shard through the dispatcher (or
    what it would purge); the document the command prints."""
    purge_checks.settings(ctx)
    purge_checks.check_policy(ctx)
    ids = [s.shard_id for s in shards]
    if dry_run:
        would = []
        ok = True
        for s in shards:
            try:
                would.append(dispatch.dry_run(ctx, s.shard_id, "purge"))
            except (PurgeRefused, ChecksumMismatch, StateConflict) as exc:
                ok = False
                would.append({"shard_id": s.shard_id, "refused": str(exc)})
        return {"command": "purge", "dry_run": True, "ok": ok, "shards": would}
    outcomes = engine.one_phase(ctx, shards, "purge")
    doc = document("purge", shard_rows(ctx, None, ids) if ids else [], outcomes)
    if not shards:
        doc["note"] = "no shard is due for purging"
    return doc
