"""`migrator audit`: what an independent monitor can check from the stores alone, reading
only (every session it opens is read-only, so credentials that can only SELECT suffice).

* the audit chain (`chain.verify`) against the heads kept in each destination region;
* residency itself: every user the directory homes in a destination region has their row
  there; no destination holds a row of a user not homed there (a stray row); and for each
  purged shard, no row of its users is back in a table the purge deletes at the source,
  and no value in a pseudonymised column there is anything but a pseudonym.

Findings name their kind, region, table and how many rows, never a row's content or a
user's key. A store that cannot be read is an error naming it, never a false "ok".
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from migrator.control.context import Context
from migrator.control.state import MOVED, State
from migrator.control.store import SCHEMA
from migrator.evidence import chain, pseudonym
from migrator.evidence import manifest as evidence
from migrator.stores import catalog, sqlgen
from migrator.stores.postgres import Conn, connect


def _read(dsn: str) -> Conn:
    c = connect(dsn, autocommit=True)
    c.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    return c


def _has(c: Conn, name: str) -> bool:
    return c.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def _owners(c: Conn, ctx: Context, table: str) -> set[str]:
    own = sqlgen.ownership(ctx.spec.entity_graph, table)
    return {k for (k,) in c.execute(sql.SQL("SELECT DISTINCT ({})::text FROM {}").format(own.owner, own.from_))}


def run(ctx: Context, since: datetime | None = None) -> dict[str, Any]:
    """The audit's document. With `since`, the costly per-shard checks (manifests' digests
    recomputed from the destination) cover only shards with audit activity since then; the
    chain and the residency checks always cover everything."""
    spec, g = ctx.spec, ctx.spec.entity_graph
    findings: list[dict[str, Any]] = []
    with _read(spec.control.url) as c:
        if not _has(c, f"{SCHEMA}.directory"):
            return {"command": "audit", "ok": True, "note": "nothing migrated yet", "findings": []}
        homes: dict[str, set[str]] = {}
        for key, home in c.execute(f"SELECT user_key, home FROM {SCHEMA}.directory"):
            homes.setdefault(home, set()).add(key)
        purged = {
            k
            for (k,) in c.execute(
                f"SELECT su.user_key FROM {SCHEMA}.shard_user su JOIN {SCHEMA}.shard s USING (shard_id) "
                "WHERE s.state = %s",
                (State.PURGED.value,),
            )
        }
        moved_to: dict[str, set[str]] = {}
        for sid, region in c.execute(
            f"SELECT shard_id, region FROM {SCHEMA}.shard WHERE state = ANY(%s)", ([p.value for p in MOVED],)
        ):
            moved_to.setdefault(region, set()).add(sid)
        members: dict[str, dict[int, list[str]]] = {}
        for sid, key, b in c.execute(f"SELECT shard_id, user_key, batch_no FROM {SCHEMA}.shard_user"):
            members.setdefault(sid, {}).setdefault(b, []).append(key)
        if since is not None:
            active = {
                sid for (sid,) in c.execute(f"SELECT DISTINCT shard_id FROM {SCHEMA}.audit WHERE at >= %s", (since,))
            }
            members = {sid: m for sid, m in members.items() if sid in active}
        for batches in members.values():
            for b in batches:
                batches[b] = ctx.sort_keys(batches[b])
        timeline = []
        for at, sid, region, users, to_state, detail in c.execute(
            f"SELECT a.at, a.shard_id, s.region, s.users, a.to_state, a.detail FROM {SCHEMA}.audit a "
            f"JOIN {SCHEMA}.shard s USING (shard_id) WHERE (a.to_state IS DISTINCT FROM a.from_state "
            "AND a.to_state IN ('cut_over', 'rolled_back', 'purged')) OR a.detail->>'event' = 'fence closed' "
            "ORDER BY a.id"
        ):
            event = "fence closed" if detail.get("event") == "fence closed" else to_state
            entry = {"at": at.isoformat(), "shard_id": sid, "region": region, "users": users, "event": event}
            if event == "fence closed":
                entry["fence_ms"] = detail.get("fence_ms")
            if event == "purged":
                entry["receipts"] = detail.get("receipts")
            timeline.append(entry)
        waves = {
            w: {"shards": n, "first": a.isoformat() if a else None, "last": b.isoformat() if b else None}
            for w, n, a, b in c.execute(
                f"SELECT s.wave, count(DISTINCT s.shard_id), min(a.at), max(a.at) FROM {SCHEMA}.shard s "
                f"LEFT JOIN {SCHEMA}.audit a ON a.shard_id = s.shard_id AND a.to_state = 'cut_over' "
                "AND a.from_state IS DISTINCT FROM a.to_state GROUP BY s.wave"
            )
        }
        has_chain = c.execute(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'audit' AND column_name = 'seq')",
            (SCHEMA,),
        ).fetchone()[0]
        rows = []
        if has_chain:
            with c.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(
                    f"SELECT id, at, run_id, shard_id, from_state, to_state, detail, seq, content, prev_sha256, "
                    f"sha256 FROM {SCHEMA}.audit"
                ).fetchall()
    heads: dict[str, list[tuple[int, str]]] = {}
    regions: dict[str, Any] = {}
    tables = list(ctx.tables)
    for r in spec.targets:
        with _read(ctx.dsn(r)) as c:
            if _has(c, "migrator.audit_heads"):
                heads[r] = [(s, h) for s, h in c.execute("SELECT seq, sha256 FROM migrator.audit_heads ORDER BY seq")]
            homed = homes.get(r, set())
            per: dict[str, int] = {}
            for t in tables:
                owners = _owners(c, ctx, t)
                per[t] = len(owners)
                stray = owners - homed
                if stray:
                    findings.append(
                        {"kind": "stray rows at a destination", "region": r, "table": t, "users": len(stray)}
                    )
                if t == g.root.table and homed - owners:
                    findings.append(
                        {
                            "kind": "users homed here without their row",
                            "region": r,
                            "table": t,
                            "users": len(homed - owners),
                        }
                    )
            n_manifests, found = evidence.check(c, ctx, r, members, moved_to.get(r, set()))
            findings += found
            regions[r] = {"users_homed": len(homed), "users_with_rows": per, "manifests": n_manifests}
    if purged and spec.purge is not None:
        p = spec.purge
        with _read(ctx.source_dsn) as c:
            for t in tables:
                action = p.action(t)
                if action == "delete":
                    back = _owners(c, ctx, t) & purged
                    if back:
                        findings.append(
                            {
                                "kind": "purged users' rows back at the source",
                                "region": spec.source_region,
                                "table": t,
                                "users": len(back),
                            }
                        )
                elif action == "pseudonymise":
                    own = sqlgen.ownership(g, t)
                    for col in p.columns(t):
                        typ = ctx.tables[t].column(col).type
                        q = sql.SQL("SELECT ({})::text, t0.{}::text FROM {}").format(
                            own.owner, sql.Identifier(col), own.from_
                        )
                        bad = sum(1 for k, v in c.execute(q) if k in purged and not pseudonym.is_pseudonym(typ, v))
                        if bad:
                            findings.append(
                                {
                                    "kind": "original values in a pseudonymised column",
                                    "region": spec.source_region,
                                    "table": t,
                                    "column": col,
                                    "rows": bad,
                                }
                            )
    checked_chain: dict[str, Any] = (
        chain.verify(rows, heads)
        if has_chain
        else {"ok": False, "findings": [{"kind": "the control database has no audit chain (run `migrator upgrade`)"}]}
    )
    findings = checked_chain["findings"] + findings
    with _read(ctx.source_dsn) as c:  # a table the spec forgot holds users' rows at the old home
        side = f"source {spec.source_region}"
        findings += [{"kind": "table left behind", "detail": why} for why in catalog.unnamed_tables(c, g, side)]
    return {
        "command": "audit",
        "ok": not findings,
        "chain": {k: v for k, v in checked_chain.items() if k != "findings"}
        | {"heads": {r: len(h) for r, h in heads.items()}},
        "residency": {"regions": regions, "purged_users": len(purged)},
        "timeline": timeline,
        "waves": waves,
        "since": since.isoformat() if since else None,
        "excluded_tables": [{"table": x.table, "reason": x.reason} for x in g.exclude],
        "findings": findings,
    }
