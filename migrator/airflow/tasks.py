"""What the Airflow tasks call: small functions that take and return plain descriptors
(ids, counts, digests -- never rows), each idempotent, so a cleared or retried task is safe.
No Airflow import here; `glue` turns errors into Airflow's terms."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from migrator.control.context import Context
from migrator.control.state import MOVED, State
from migrator.control.store import Shard
from migrator.errors import MigratorError, SpecError
from migrator.evidence import audit
from migrator.evidence import report as report_pages
from migrator.lifecycle import dispatch
from migrator.phases import purge, purge_checks
from migrator.phases.plan import plan as make_plan
from migrator.spec import Spec, parse_spec, read_yaml

log = logging.getLogger("migrator.airflow.tasks")
_CONN = re.compile(r"^conn:([A-Za-z0-9_.-]+)$")


def load(spec_path: str, resolve_conn=None, batch_users: int | None = None, resolve_s3=None) -> Spec:
    """The spec, with `conn:<id>` DSNs and object stores taken from the orchestrator's
    connections (`resolve_conn(id) -> uri`, `resolve_s3(id) -> {endpoint, access_key, secret_key}`)."""
    data = read_yaml(spec_path)
    if not isinstance(data, dict):
        return parse_spec(data, spec_path)  # refused, naming the file
    stores = [*(data.get("regions") or {}).values(), data.get("control") or {}]
    for store in stores:
        m = _CONN.match(str(store.get("dsn", "")))
        if m and resolve_conn is not None:
            store["dsn"] = resolve_conn(m.group(1))
    for store in ((data.get("objects") or {}).get("stores") or {}).values():
        m = _CONN.match(str(store.get("endpoint", "")))
        if m and resolve_s3 is not None:
            store.update({k: v for k, v in resolve_s3(m.group(1)).items() if v})
    if batch_users:
        data.setdefault("copy", {})["batch_users"] = int(batch_users)
    return parse_spec(data, spec_path)


RUN_WAVE = "all-"  # a run's own wave: no other run names it


def wave_for(scope: str, start: datetime | None, end: datetime | None, run_id: str) -> str:
    """The wave a migration run plans: an interval's (shared by every run of the interval),
    or the run's own, a short name an operator can type (`all-20261207-1123-9f3a`: the
    time in its id and four hex digits of the id), written into the run's note."""
    if scope == "all" or start is None or end is None:
        return RUN_WAVE + short_name(run_id)
    return f"interval-{start:%Y%m%dT%H%M}-{end:%Y%m%dT%H%M}"


def short_name(run_id: str) -> str:
    """A run id as a short, typeable name: a short id as it is, a long one as its date
    and time (when it has one) and four hex digits of its hash."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,24}", run_id):
        return run_id
    digest = hashlib.sha1(run_id.encode()).hexdigest()[:4]
    m = re.search(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})", run_id)
    return f"{''.join(m.groups()[:3])}-{''.join(m.groups()[3:])}-{digest}" if m else digest


def wave_named(ctx: Context, wave: str | None) -> str | None:
    """The wave a form or command names: its name, or the id of the migration run that
    planned it (whose wave has another name)."""
    if wave is None or not ctx.control.exists() or ctx.control.shards(wave=wave):
        return wave
    own = RUN_WAVE + short_name(wave)
    return own if ctx.control.shards(wave=own) else wave


def existing_wave(spec: Spec, name: str) -> str:
    """The wave a run is asked to work on again (by its name or its run's id); refused
    when no shard is in it."""
    ctx = Context(spec, "lookup")
    wave = wave_named(ctx, name)
    if wave is None or not ctx.control.exists() or not ctx.control.shards(wave=wave):
        raise SpecError(f"wave {name!r}: no shard is in it (a migration run's note names its wave)")
    return wave


def plan(
    spec: Spec,
    run_id: str,
    wave: str,
    since: datetime | None,
    until: datetime | None,
    regions: list[str] | None,
    shards: list[str] | None,
    dry_run: bool,
) -> list[dict[str, Any]]:
    """The wave's shards (planned, or only worked out in a dry run), each with its users,
    estimated rows per table and bytes; the table is logged for the run's log."""
    ctx = Context(spec, run_id)
    # a run's own wave ("all-<run id>") is planned for its regions only; an interval's wave
    # is shared by every run of the interval, so it covers every region
    own = wave.startswith(RUN_WAVE)
    p = make_plan(ctx, wave, since=since, until=until, regions=regions or None, dry_run=dry_run, only_regions=own)
    out = []
    for s in p.shards:
        if shards and s.name not in shards and s.shard_id not in shards:
            continue
        out.append({**s.summary(), "dry_run": dry_run})
    log.info("%s", plan_table(wave, out, dry_run))
    return out


def plan_table(wave: str, shards: list[dict[str, Any]], dry_run: bool) -> str:
    """The plan as a plain-text table: shard, move (from→to), users, batches, rows per table,
    bytes; then the users moving per pair."""
    tables = sorted({t for s in shards for t in s["rows"]})
    head = ["shard", "move", "users", "batches", *tables, "approx MB"]
    rows = [
        [
            s["name"],
            f"{s['from']}→{s['region']}" if s.get("from") else s["region"],
            str(s["users"]),
            str(s["batches"]),
            *(("" if t not in s["rows"] else f"{s['rows'][t]}{'' if s['rows_exact'] else '~'}") for t in tables),
            f"{s['approx_bytes'] / 1e6:.1f}",
        ]
        for s in shards
    ]
    rows.append(
        [
            "total",
            "",
            str(sum(s["users"] for s in shards)),
            str(sum(s["batches"] for s in shards)),
            *(str(sum(s["rows"].get(t, 0) for s in shards)) for t in tables),
            f"{sum(s['approx_bytes'] for s in shards) / 1e6:.1f}",
        ]
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"{'dry run: ' if dry_run else ''}wave {wave}: {len(shards)} shard(s) (~ estimated rows)"]
    lines += [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head, *rows]
    ]
    pairs: dict[str, int] = {}
    for s in shards:
        pair = f"{s.get('from') or '?'}→{s['region']}"
        pairs[pair] = pairs.get(pair, 0) + s["users"]
    if pairs:
        lines.append("moves: " + ", ".join(f"{k} {v} user(s)" for k, v in sorted(pairs.items())))
    return "\n".join(lines)


def by_region(shards: list[dict[str, Any]], groups: list[str]) -> dict[str, Any]:
    """The plan task's outputs: each group's shards to map over (none in a dry run), all of
    them for the report, and the plan itself. A lone group named "shard" takes every
    region; otherwise a region without a group is refused (the DAG file was parsed with
    another spec)."""
    moving = [s for s in shards if not s["dry_run"]]
    out: dict[str, Any] = {g: [] for g in groups}
    for s in moving:
        g = "shard" if groups == ["shard"] else s["region"]
        if g not in out:
            raise SpecError(
                f"shard {s['shard_id']}: region {s['region']!r} has no task group in this DAG "
                f"(it has {', '.join(groups)}); the DAG file was parsed with another spec"
            )
        out[g].append(s)
    out["all"] = moving
    out["plan"] = shards
    return out


def phase(spec: Spec, run_id: str, shard_id: str, what: str, reason: str = "", dry_run: bool = False) -> dict[str, Any]:
    """One phase of one shard through the dispatcher; `skipped` in the result says the work
    was already done (the task shows it as skipped, never as work done). A dry run says
    what the dispatcher would do."""
    ctx = Context(spec, run_id)
    if dry_run:
        return dispatch.preview(ctx, shard_id, what)
    out = dispatch.run_phase(ctx, shard_id, what, reason).descriptor()
    log.info("%s", summary(out))  # one line a person reads in the task's log, beside the returned value
    return out


def summary(result: dict[str, Any]) -> str:
    """A phase's result in words: the shard, what happened, and its counts and digest."""
    sid, phase = result.get("shard_id"), result.get("phase")
    if result.get("skipped"):
        return f"shard {sid}: {phase} skipped ({result['skipped']}); state {result.get('state')}"
    parts = [f"shard {sid}: {phase} done; state {result.get('state')}"]
    rows = result.get("rows")
    if isinstance(rows, dict) and rows:
        parts.append("rows " + ", ".join(f"{t} {n}" for t, n in sorted(rows.items())))
    if result.get("digest"):
        parts.append(f"digest {str(result['digest'])[:12]}")
    for key, words in (("users", "users"), ("objects_deleted", "objects deleted"), ("batches", "batches")):
        if isinstance(result.get(key), int):
            parts.append(f"{result[key]} {words}")
    deleted = result.get("deleted")
    if isinstance(deleted, dict) and deleted:
        parts.append("rows deleted " + ", ".join(f"{t} {n}" for t, n in sorted(deleted.items())))
    return "; ".join(parts)


def named_phase(
    spec: Spec, run_id: str, wave: str | None, names: list[str], what: str, reason: str, dry_run: bool = False
) -> list[dict[str, Any]]:
    """One phase for each shard an operator named (each name within one wave, or refused)."""
    return [phase(spec, run_id, s, what, reason, dry_run=dry_run) for s in shard_ids(spec, wave, names)]


def migration_conf(params: dict[str, Any], done: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The conf of the migration run that runs the shards a retry planned again (one wave:
    a retry names its shards within one); None in release mode."""
    if params.get("mode") != "retry" or not done:
        return None
    ids = [d["shard_id"] for d in done]
    conf: dict[str, Any] = {"scope": "all", "wave": ids[0].split("/")[0], "shards": ids}
    if params.get("spec"):
        conf["spec"] = params["spec"]
    return conf


def rollback_if_terminal(spec: Spec, run_id: str, shard_id: str, reason: str) -> dict[str, Any]:
    """The DAG's automatic rollback (`rollback_failed`): the dispatcher rolls back only a
    shard that failed for good; one that a transient outage stopped is skipped, and resumes
    from its checkpoint when its failed task is cleared."""
    return phase(spec, run_id, shard_id, "rollback_failed", reason)


def shard_ids(spec: Spec, wave: str | None, names: list[str]) -> list[str]:
    """The shards named, each within one wave; a name that matches several waves is refused."""
    ctx = Context(spec, "lookup")
    return [s.shard_id for s in ctx.control.resolve(wave_named(ctx, wave), names)]


def approval_summary(spec: Spec, shard_id: str) -> str:
    """What an approver sees before a shard's cutover (Markdown): its users, and the rows and
    digest its last verify compared on both sides. Counts and digests only, no user data."""
    ctx = Context(spec, "approval")
    shard = ctx.control.shard(shard_id)
    last = shard.last_verify or {}
    rows = last.get("rows") or {}
    lines = [
        f"**Shard {shard.name}** ({shard_id}): {shard.users} users from **{ctx.origin(shard)}** to "
        f"**{shard.region}**, state `{shard.state.value}`.",
        "",
        f"Last verify: {'matched' if last.get('matched') else 'NOT matched'}, digest `{last.get('digest') or '-'}`.",
        "",
        "| table | rows (source = destination) |",
        "|---|---:|",
        *(f"| {t} | {n} |" for t, n in sorted(rows.items())),
        "",
        "Approve: the cutover fences these users for a moment and homes them in the destination. "
        "Reject: the shard is rolled back, with your reason in the audit trail.",
    ]
    return "\n".join(lines)


APPROVED, REJECTED = "cutover approved", "cutover rejected"


def cutover_answer(spec: Spec, run_id: str, shard_id: str) -> dict[str, Any] | None:
    """The approver's answer to the shard's cutover in this run since its last verify (a new
    verify asks again), or None: what a retried cutover task acts on without asking again."""
    answer = Context(spec, run_id).control.shard(shard_id).approval
    return answer if answer is not None and answer.get("run_id") == run_id else None


def answer_cutover(spec: Spec, run_id: str, shard_id: str, approved: bool, who: str, reason: str) -> dict[str, Any]:
    """An approver's answer: kept by the state machine first (with the digest they were
    shown), then acted on."""
    ctx = Context(spec, run_id)
    shown = (ctx.control.shard(shard_id).last_verify or {}).get("digest")
    answer = {"event": APPROVED if approved else REJECTED, "by": who, "reason": reason, "digest": shown}
    ctx.control.keep(shard_id, answer, approval={**answer, "run_id": run_id})
    return act_on_answer(spec, run_id, shard_id, answer)


def act_on_answer(spec: Spec, run_id: str, shard_id: str, answer: dict[str, Any]) -> dict[str, Any]:
    """Approved: the cutover. Rejected: the shard rolled back, the approver's reason recorded
    with it; the result says the cutover was skipped, and why."""
    if answer["event"] == APPROVED:
        return phase(spec, run_id, shard_id, "cutover")
    who = answer.get("by") or "an approver"
    why = f"cutover rejected by {who}: {answer.get('reason') or 'no reason given'}"
    phase(spec, run_id, shard_id, "rollback", reason=why)
    return {"shard_id": shard_id, "skipped": f"cutover rejected by {who}; the shard was rolled back"}


def verdict(spec: Spec, ids: list[str] | None) -> dict[str, Any]:
    """The states of a run's shards; raises when any of them did not cut over, or when there
    is no plan (the plan task failed: nothing was moved)."""
    if ids is None:
        raise MigratorError("the plan task did not finish, so no shard was moved; its log says why")
    shards = _recorded(spec, ids)
    if shards:  # every shard's state, in the report task's log, whatever the verdict
        rows = [
            f"{s.name:<10} {s.origin or '':>4}→{s.region:<6} {s.state.value:<12} {s.users:>7} users" for s in shards
        ]
        log.info("%d shard(s):\n%s", len(rows), "\n".join(rows))
    return {"shards": len(ids), "cut_over": _all_in(ids, shards, MOVED, "did not cut over")}


def _recorded(spec: Spec, ids: list[str]) -> list[Shard]:
    return Context(spec, "report").control.shards(names=ids) if ids else []


def _all_in(ids: list[str], shards: list[Shard], wanted: frozenset[State], failing: str) -> int:
    """How many of the shards are in one of the wanted states; raises naming the others,
    and any of `ids` with no record left in the control database."""
    states = {s.shard_id: s.state for s in shards}
    bad = {k: f"is {v}" for k, v in states.items() if v not in wanted}
    bad |= {k: "has no record in the control database" for k in ids if k not in states}
    if bad:
        raise MigratorError(
            f"{len(bad)} of {len(ids)} shard(s) {failing}: " + ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
        )
    return len(states)


def purge_select(
    spec: Spec, run_id: str, wave: str | None, names: list[str] | None, region: str | None, origin: str | None = None
) -> list[str]:
    """The shards the purge DAG works on: those named, or every one whose purge is due
    (bound for `region`, their users moving from `origin`, when given)."""
    ctx = Context(spec, run_id)
    purge_checks.settings(ctx)
    purge_checks.check_policy(ctx)
    return [s.shard_id for s in purge.select(ctx, wave, names or None, region) if origin in (None, ctx.origin(s))]


def purge_one(spec: Spec, run_id: str, shard_id: str, dry_run: bool) -> dict[str, Any]:
    """One shard's purge (or, in a dry run, what it would delete and pseudonymise)."""
    if dry_run:
        return dispatch.dry_run(Context(spec, run_id), shard_id, "purge")
    return phase(spec, run_id, shard_id, "purge")


def purge_verdict(spec: Spec, ids: list[str], dry_run: bool) -> dict[str, Any]:
    """Fails the run unless every selected shard is purged (after a real run); with
    nothing due, says when the next shard's retention ends."""
    if not ids:
        nxt = purge_checks.next_due(Context(spec, "purge"))
        said = (
            f"nothing due; the next, shard {nxt[0]}, is due at {nxt[1].isoformat(timespec='minutes')}"
            if nxt
            else "nothing due, and no cut-over shard waits for its purge"
        )
        log.info("%s", said)
        return {"shards": 0, "dry_run": dry_run, "said": said, **({"next_due": nxt[1].isoformat()} if nxt else {})}
    if dry_run:
        return {"shards": len(ids), "dry_run": dry_run}
    return {"shards": len(ids), "purged": _all_in(ids, _recorded(spec, ids), frozenset({State.PURGED}), "not purged")}


def audit_check(spec: Spec, run_id: str, since: datetime | None = None) -> dict[str, Any]:
    """The residency_audit DAG's check: `migrator audit`; raises naming every finding's kind,
    region and table (never a row's content), so the run fails and its alerting reaches someone."""
    doc = audit.run(Context(spec, run_id), since=since)
    kept = keep_reports(doc, spec, run_id)
    if not doc["ok"]:
        named = "; ".join(
            f["kind"] + "".join(f" {k} {f[k]}" for k in ("region", "to", "table", "column", "seq") if k in f)
            for f in doc["findings"][:20]
        )
        raise MigratorError(f"the audit found {len(doc['findings'])} problem(s): {named}")
    return {"ok": True, "sealed": doc.get("chain", {}).get("sealed", 0), **kept}


REPORTS_ENV = "MIGRATOR_REPORTS_DIR"  # where the audit DAG keeps its reports, for the Residency view


def keep_reports(doc: dict[str, Any], spec: Spec, run_id: str) -> dict[str, Any]:
    """The audit's report for people and its records of processing, kept under
    $MIGRATOR_REPORTS_DIR (when set) for the Residency view to link to: `latest.html` and
    `latest.json` (the document: counts, kinds and digests, no user's data) replaced whole
    at each run, whatever the verdict, and `records/`."""
    folder = os.environ.get(REPORTS_ENV)
    if not folder:
        return {}
    base = Path(folder)
    base.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "run_id": run_id, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    staged = report_pages.write_html(doc, base / ".latest.html.part")
    staged.replace(base / "latest.html")
    (base / ".latest.json.part").write_text(json.dumps(doc, default=str))
    (base / ".latest.json.part").replace(base / "latest.json")
    records = report_pages.write_records(doc, spec, base / "records")
    log.info("audit report kept: %s (%d record file(s))", base / "latest.html", len(records))
    return {"report": str(base / "latest.html")}
