"""What `migrator audit` writes for people: an HTML report (`--html`) with plots, and the
records of processing per wave (`--records`, GDPR Art. 30's view of the run). Both are
made from the audit's document alone: counts, digests, times and findings, never a row's
content or a user's key."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from migrator.spec import Spec


def _pyplot() -> Any:
    """matplotlib's pyplot, imported when a report is drawn: at the top it cost every
    `migrator` command about a second of start-up (a quarter of the command line's import
    time, measured with `python -X importtime`), for a plot only `audit --html` draws."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _moved_over_time(timeline: list[dict[str, Any]]) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 3.2))
    per: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    total: dict[str, int] = defaultdict(int)
    for e in timeline:
        if e["event"] in ("cut_over", "rolled_back"):
            if not per[e["region"]]:
                per[e["region"]].append((datetime.fromisoformat(e["at"]), 0))
            total[e["region"]] += e["users"] if e["event"] == "cut_over" else -e["users"]
            per[e["region"]].append((datetime.fromisoformat(e["at"]), total[e["region"]]))
    for region, points in sorted(per.items()):
        xs, ys = zip(*points)
        ax.step(xs, ys, where="post", label=region)
    ax.set_title("users moved, by destination region")
    ax.set_ylabel("users")
    if per:
        ax.legend()
    fig.autofmt_xdate()
    return _png(fig)


def _fence_windows(timeline: list[dict[str, Any]]) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 3.2))
    fences = [(e["shard_id"], e.get("fence_ms") or 0) for e in timeline if e["event"] == "fence closed"]
    if fences:
        names, ms = zip(*fences)
        ax.bar(range(len(ms)), ms)
        ax.set_xticks(range(len(ms)), [n.split("/")[-1] for n in names], rotation=45, ha="right")
    ax.set_title("write fence per cutover")
    ax.set_ylabel("ms")
    return _png(fig)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(doc: dict[str, Any], path: Path) -> Path:
    timeline = doc.get("timeline", [])
    regions = doc.get("residency", {}).get("regions", {})
    region_rows = [
        {
            "region": r,
            "users homed": v["users_homed"],
            "manifests": v.get("manifests", 0),
            **{f"{t} users": n for t, n in v["users_with_rows"].items()},
        }
        for r, v in sorted(regions.items())
    ]
    cols = sorted({k for r in region_rows for k in r}, key=lambda k: (k != "region", k != "users homed", k))
    purges = []
    for e in timeline:
        if e["event"] == "purged" and e.get("receipts"):
            for t, v in sorted(e["receipts"]["tables"].items()):
                purges.append({"shard": e["shard_id"], "table": t, **v})
    chain = doc.get("chain", {})
    status = "all checks passed" if doc["ok"] else f"{len(doc['findings'])} finding(s)"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Residency audit</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:left}.ok{color:#070}.bad{color:#b00}</style>",
        "</head><body>",
        "<h1>Residency audit</h1>",
        f"<p class='{'ok' if doc['ok'] else 'bad'}' id='status'><b>{html.escape(status)}</b></p>",
        "<h2>Regions</h2>",
        _table(region_rows, cols),
        "<h2>Audit chain</h2>",
        _table(
            [
                {
                    "sealed rows": chain.get("sealed"),
                    "unsealed rows": chain.get("unsealed"),
                    **{f"heads in {r}": n for r, n in chain.get("heads", {}).items()},
                }
            ],
            ["sealed rows", "unsealed rows", *[f"heads in {r}" for r in chain.get("heads", {})]],
        ),
        "<h2>Findings</h2>",
        _table(doc["findings"], ["kind", "region", "to", "shard", "table", "column", "seq", "users", "rows"])
        if doc["findings"]
        else "<p>none</p>",
        "<h2>Drift (changes the application or a schema change explains)</h2>",
        _table(doc.get("drift", []), ["kind", "region", "shard", "table", "rows_written"])
        if doc.get("drift")
        else "<p>none</p>",
        "<h2>Users moved over time</h2>",
        f"<img alt='users moved over time' src='data:image/png;base64,{_moved_over_time(timeline)}'>",
        "<h2>Fence windows</h2>",
        f"<img alt='fence windows' src='data:image/png;base64,{_fence_windows(timeline)}'>",
        "<h2>Purge receipts</h2>",
        _table(purges, ["shard", "table", "action", "rows_deleted", "rows_pseudonymised", "rows_kept"])
        if purges
        else "<p>none</p>",
        "</body></html>",
    ]
    path.write_text("\n".join(parts))
    return path


def write_records(doc: dict[str, Any], spec: Spec, folder: Path) -> list[Path]:
    """One Markdown record of processing per wave: categories, from where to where, when,
    under which policy version, what stayed pseudonymised and how."""
    folder.mkdir(parents=True, exist_ok=True)
    g = spec.entity_graph
    tables = [g.root.table] + [t.table for t in g.tables]
    policy_digest = hashlib.sha256(json.dumps(spec.policy, sort_keys=True).encode()).hexdigest()
    targets = defaultdict(list)
    for code, region in sorted(spec.policy.items()):
        if region != spec.source_region:
            targets[region].append(code)
    # each shard's last move, in the order of the audit trail: it moved unless rolled back since
    last: dict[str, tuple[str, str, str]] = {}
    for e in doc.get("timeline", []):
        if e["event"] in ("cut_over", "rolled_back", "purged"):
            last[e["shard_id"]] = (e["event"], e.get("from", spec.source_region), e["region"])
    out = []
    for wave, w in sorted(doc.get("waves", {}).items()):
        moved = {
            sid: (frm, r)
            for sid, (event, frm, r) in last.items()
            if sid.startswith(f"{wave}/") and event != "rolled_back"
        }
        to: dict[str, list[str]] = defaultdict(list)  # origin -> the regions it moved users to
        for frm, r in sorted(set(moved.values())):
            to[frm].append(r)
        transfer = (
            "; ".join(
                f"from region {frm} to "
                + "; ".join(f"{r} (residents of {', '.join(targets.get(r, []))})" for r in regions)
                for frm, regions in sorted(to.items(), key=lambda kv: (kv[0] != spec.source_region, kv[0]))
            )
            if to
            else "none: no shard of this wave is moved"
        )
        lines = [
            f"# Record of processing: wave {wave}",
            "",
            "Purpose: keep each user's personal data in the region their residency requires.",
            "",
            f"- Transfer: {transfer}",
            f"- When: first cutover {w['first'] or 'none yet'}, last {w['last'] or 'none yet'}; "
            f"{len(moved)} of the wave's {w['shards']} shard(s) moved",
            f"- Policy version: SHA-256 {policy_digest} of the residency policy",
            f"- Categories of data (tables of the user's entity graph): {', '.join(tables)}",
        ]
        if spec.purge is not None:
            p = spec.purge
            kept = [f"{t} ({', '.join(p.columns(t))})" for t in tables if p.action(t) == "pseudonymise"]
            lines += [
                f"- Retention at the source after cutover: {p.after}; then deleted: "
                + ", ".join(t for t in tables if p.action(t) == "delete"),
                "- Stayed at the source, pseudonymised (HMAC-SHA256 under the destination region's key, held "
                "in that region): " + (", ".join(kept) or "nothing"),
                "- Kept as they are: " + (", ".join(t for t in tables if p.action(t) == "keep") or "nothing"),
            ]
        lines += [
            "- Safeguards: every row verified by digest on both sides before cutover; the audit trail is a hash "
            "chain whose head is kept in each destination region; "
            + (
                "per-shard manifests signed with each destination region's Ed25519 key."
                if spec.evidence
                else "no signed manifests configured."
            ),
            "- Audit at the time of writing: "
            + ("all checks passed" if doc["ok"] else f"{len(doc['findings'])} finding(s)"),
            "",
        ]
        path = folder / f"records-{wave}.md"
        path.write_text("\n".join(lines))
        out.append(path)
    return out
