"""The Residency view: one page in the Airflow UI's navigation, where every wave and shard
stands now, read from the control database through the library (an Airflow 3 plugin: a
FastAPI app served by the api-server, shown in the UI by an external view).

Per shard: its from→to pair, state (a rolled-back shard's users held or released), its
progress in batches and rows with an ETA from the rate its batches were committed at, its
last error as the store named it, its last fence window and, once cut over, when its
retention ends, and the objects copied with their size. Above them the residency picture
(users homed per region) and the cutovers waiting for an approval, each linked to its
Required Actions. From a shard's
row the actions an operator takes (roll back, release, retry, purge) trigger the right
DAG through Airflow's own API with the wave and shard filled in and a reason asked for,
so the run is the operator's, under their name.

The page and its data need a signed-in Airflow user (the UI's session); it shows counts,
states and errors, never a row of user data or a user's key.
"""

from __future__ import annotations

import html
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.api_fastapi.core_api.security import requires_authenticated
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from migrator.airflow import glue, notes, tasks
from migrator.control.context import Context
from migrator.control.state import TRANSITIONS, State
from migrator.control.store import SCHEMA
from migrator.errors import MigratorError, describe
from migrator.lifecycle import report

app = FastAPI(title="Residency", dependencies=[Depends(requires_authenticated())])


def _connection(conn_id: str) -> Any:
    from airflow.models.connection import Connection  # the api-server's own (no task context here)

    return Connection.get_connection_from_secrets(conn_id)


def _resolve_conn(conn_id: str) -> str:
    return _connection(conn_id).get_uri().replace("postgres://", "postgresql://", 1)


def _resolve_s3(conn_id: str) -> dict[str, str | None]:
    c = _connection(conn_id)
    return {"endpoint": (c.extra_dejson or {}).get("endpoint_url"), "access_key": c.login, "secret_key": c.password}


def _context() -> Context:
    specs = glue.configured_specs()
    if "default" not in specs:
        raise MigratorError(f"${glue.SPEC_ENV} is not set where the api-server runs: no spec to read")
    return Context(tasks.load(specs["default"], _resolve_conn, resolve_s3=_resolve_s3))


def snapshot(ctx: Context) -> dict[str, Any]:
    """Where every wave and shard stands now, and who is homed where."""
    ctl, src = ctx.control, ctx.spec.source_region
    if not ctl.exists():
        return {"waves": {}, "homes": {}, "source_region": src}
    rows = report.shard_rows(ctx, None, None)
    with ctl.connect(autocommit=True) as c:
        homes = dict(c.execute(f"SELECT home, count(*) FROM {SCHEMA}.directory GROUP BY home ORDER BY 1").fetchall())
        fences = dict(
            c.execute(
                f"SELECT DISTINCT ON (shard_id) shard_id, (detail->>'fence_ms')::float FROM {SCHEMA}.audit "
                "WHERE detail->>'event' = 'fence closed' ORDER BY shard_id, id DESC"
            ).fetchall()
        )
        pace = {
            sid: (n, first, last)
            for sid, n, first, last in c.execute(
                f"SELECT shard_id, count(*), min(at), max(at) FROM {SCHEMA}.checkpoint GROUP BY shard_id"
            ).fetchall()
        }
    waves: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        sid = r["shard_id"]
        row = {**r, "pair": f"{r.get('from') or src}→{r['region']}", "fence_ms": fences.get(sid)}
        n, first, last = pace.get(sid, (0, None, None))
        left = r["batches"] - r["batches_done"]
        if r["state"] == "copying" and n >= 2 and left > 0 and first and last:
            row["eta_s"] = round((last - first).total_seconds() / (n - 1) * left)
        elif r["state"] == "copying" and n == 1 and left > 0 and last:  # from the copy's start
            started = ctl.shard(sid).state_since
            if started is not None and last > started:
                row["eta_s"] = round((last - started).total_seconds() * left)
        since = ctl.shard(sid).state_since if r["state"] == "cut_over" else None
        if since is not None and ctx.spec.purge is not None:  # when its retention ends
            end = datetime.fromtimestamp(since.timestamp() + ctx.spec.purge.after_s, UTC)
            row["purge_due"] = "now" if end <= datetime.now(UTC) else end.isoformat(timespec="minutes")
        waves.setdefault(r["wave"], []).append(row)
    return {"waves": waves, "homes": homes, "source_region": src}


@app.get("/api/snapshot")
def snapshot_json() -> dict[str, Any]:
    return snapshot(_context())


ROLLBACK_FROM = {s.value for s, to in TRANSITIONS.items() if State.ROLLING_BACK in to}  # the state machine's


def _button(label: str, dag: str, conf: dict[str, Any], reason: bool = True) -> str:
    return (
        f"<button data-dag='{dag}' data-conf='{html.escape(json.dumps(conf))}' data-label='{label}'"
        + ("" if reason else " data-no-reason='1'")
        + f">{label}</button>"
    )


def _actions(row: dict[str, Any]) -> str:
    """The buttons of a shard's row: what an operator may do with it in its state."""
    conf = {"shards": [row["name"]], "wave": row["wave"]}
    out = []
    if row["state"] in ROLLBACK_FROM:
        out.append(_button("roll back", "residency_rollback", conf))
    if row.get("users_held"):  # a rolled-back shard whose users are still held
        out.append(_button("release", "residency_release", {**conf, "mode": "release"}))
        out.append(_button("retry", "residency_release", {**conf, "mode": "retry"}))
    if row.get("purge_due") == "now":
        out.append(_button("purge", "residency_purge", conf, reason=False))
    return " ".join(out)


def _objects(row: dict[str, Any]) -> str:
    """The objects copied so far, and their size."""
    if "objects" not in row["rows"]:
        return ""
    return f"{row['rows']['objects']} ({row.get('object_bytes', 0) / 1e6:.1f} MB)"


def _cell(v: Any) -> str:
    return "" if v is None else html.escape(str(v))


def _state(row: dict[str, Any]) -> str:
    if "users_held" in row:
        return f"{row['state']} ({'held' if row['users_held'] else 'released'})"
    return row["state"]


SCRIPT = """
(async () => {
  const r = await fetch('../api/v2/dags/residency_migration/dagRuns/~/hitlDetails?response_received=false',
    {credentials: 'same-origin'});
  if (!r.ok) return;
  const items = ((await r.json()).hitl_details || []).filter(h => h.task_instance.state === 'awaiting_input');
  const ul = document.getElementById('approvals');
  if (!items.length) return;
  ul.replaceChildren(...items.map(h => {
    const ti = h.task_instance, li = document.createElement('li'), a = document.createElement('a');
    li.dataset.shard = ti.rendered_map_index || '';
    a.href = '../dags/residency_migration/runs/' + encodeURIComponent(ti.dag_run_id) + '/tasks/' + ti.task_id
      + '/mapped/' + ti.map_index + '/required_actions';
    a.textContent = 'shard ' + (ti.rendered_map_index || ti.map_index) + ' (run ' + ti.dag_run_id + ')';
    li.append(a, ': ' + h.subject);
    return li;
  }));
})();
document.querySelectorAll('button[data-dag]').forEach(b => b.addEventListener('click', async () => {
  const conf = JSON.parse(b.dataset.conf);
  if (!b.dataset.noReason) {
    const reason = (window.prompt(b.dataset.label + ' ' + conf.shards[0] + ': the reason (recorded)') || '').trim();
    if (reason.length < 3) { document.getElementById('said').textContent = 'a reason is needed'; return; }
    conf.reason = reason;
  }
  const r = await fetch('../api/v2/dags/' + b.dataset.dag + '/dagRuns', {method: 'POST', credentials: 'same-origin',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify({logical_date: null, conf: conf})});
  const body = await r.json().catch(() => ({}));
  document.getElementById('said').textContent = r.ok ? (b.dataset.dag + ': run ' + body.dag_run_id + ' started')
    : (b.dataset.dag + ': refused (' + r.status + ')');
}));
"""


def _latest_audit() -> dict[str, Any] | None:
    """The residency_audit DAG's last document, where it keeps its reports (see
    `tasks.keep_reports`); None when none is kept."""
    folder = os.environ.get(tasks.REPORTS_ENV)
    path = Path(folder) / "latest.json" if folder else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


@app.get("/audit", response_class=HTMLResponse)
def audit_report() -> str:
    """The audit's report for people, as the residency_audit DAG last wrote it."""
    folder = os.environ.get(tasks.REPORTS_ENV)
    path = Path(folder) / "latest.html" if folder else None
    if path is None or not path.is_file():
        raise HTTPException(
            404, f"no audit report kept yet (the residency_audit DAG keeps it under ${tasks.REPORTS_ENV})"
        )
    return path.read_text()


def _audit_line(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "<p id='audit'>No audit report kept yet: the residency_audit DAG keeps one at each run.</p>"
    kinds: dict[str, int] = {}
    for f in doc.get("findings", []):
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    verdict = "ok" if doc.get("ok") else f"{len(doc.get('findings', []))} finding(s)"
    found = "".join(f"<li>{_cell(k)}: {n}</li>" for k, n in sorted(kinds.items()))
    return (
        f"<p id='audit'>Latest audit: <b>{_cell(verdict)}</b> at {_cell(doc.get('at'))} "
        f"(drift explained: {len(doc.get('drift', []))}) <a href='audit' target='_blank'>report</a></p>"
        + (f"<ul id='findings'>{found}</ul>" if found else "")
    )


@app.get("/", response_class=HTMLResponse)
def page() -> str:
    try:
        snap = snapshot(_context())
    except Exception as exc:  # the page says what it cannot read, naming the store
        return f"<!doctype html><p id='error'>cannot read the migration's state: {html.escape(describe(exc))}</p>"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Residency</title><style>"
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #bbb;padding:3px 6px;text-align:left}.failed{color:#b00}.cut_over{color:#070}"
        "</style></head><body><h1>Residency</h1><p id='said' role='status'></p>",
        _audit_line(_latest_audit()),
        "<h2>Users homed per region</h2><table id='homes'><tr><th>region</th><th>users</th></tr>",
        *[f"<tr><td>{_cell(r)}</td><td>{n}</td></tr>" for r, n in snap["homes"].items()],
        "</table>",
        # filled in by the script from Airflow's own API: the cutovers waiting for an answer
        "<h2>Approvals pending</h2><ul id='approvals'><li>none</li></ul>",
    ]
    cols = [
        "shard",
        "from→to",
        "state",
        "users",
        "batches",
        "rows",
        "objects",
        "ETA",
        "fence ms",
        "purge due",
        "error",
        "",
    ]
    for wave, rows in sorted(snap["waves"].items()):
        parts.append(f"<h2>wave {_cell(wave)}</h2><table class='wave' data-wave='{_cell(wave)}'><tr>")
        parts += [f"<th>{c}</th>" for c in cols] + ["</tr>"]
        for r in sorted(rows, key=lambda r: r["name"]):
            eta = f"{r['eta_s']} s" if "eta_s" in r else ""
            cells = [
                r["name"],
                r["pair"],
                _state(r),
                r["users"],
                f"{r['batches_done']}/{r['batches']}",
                sum(n for t, n in r["rows"].items() if t != "objects"),
                _objects(r),
                eta,
                r.get("fence_ms"),
                r.get("purge_due"),
                r.get("error"),
            ]
            parts.append(
                f"<tr data-shard='{_cell(r['name'])}' class='{_cell(r['state'])}'>"
                + "".join(f"<td>{_cell(v)}</td>" for v in cells)
                + f"<td>{_actions(r)}</td></tr>"
            )
        parts.append("</table>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "".join(parts)


class ResidencyPlugin(AirflowPlugin):
    name = "residency"
    fastapi_apps = [{"app": app, "url_prefix": "/residency", "name": "Residency"}]
    listeners = [notes]  # the migration runs' wave, in their notes
    external_views = [
        {
            "name": "Residency",
            "href": "residency/",
            "destination": "nav",
            "url_route": "residency",
            "category": "browse",
        }
    ]
