"""`migrator audit`: what an independent monitor can check from the stores alone, reading
only (every session it opens is read-only, so credentials that can only SELECT suffice;
the source copy's digest uses a temporary table, which PUBLIC may create by default).

* the audit chain (`chain.verify`) against the heads kept in each destination region;
* the signed manifests kept in each destination (`manifest.check`): a table changed since
  its manifest is drift when the application's logged writes or a schema change explain
  it, and a finding when nothing does;
* residency itself, for every user the directory knows: rows at their home only. At a
  destination, a row of a user not homed there is a stray row, unless the user's shard
  is in flight there (copying to verified, failed or rolling back: reported as in flight);
  every user homed there has their row; a user homed there whose residency (read there,
  where they write it) the policy now sends elsewhere is a finding until a run re-homes
  them. At the source, a cut-over shard's copy is kept
  for the retention and must be exactly what the cutover froze; any other row of a user
  homed elsewhere is a stray row; and each purged shard's rows are checked against its
  own receipts (the policy that purge applied, whatever the spec says now): none back in
  a table it deleted, nothing but pseudonyms in the columns it pseudonymised, and the
  rows it kept as many as it kept.

Findings name their kind, region, table and how many rows or users, never a row's content
or a user's key. A store that cannot be read is an error naming it, never a false "ok".
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from migrator.control.context import Context
from migrator.control.state import IN_FLIGHT, MOVED, State
from migrator.control.store import SCHEMA
from migrator.evidence import chain, pseudonym
from migrator.evidence import manifest as evidence
from migrator.shard.digest import ColumnsGone, CopyDigest, digest_copy
from migrator.stores import catalog, sqlgen
from migrator.stores.postgres import Conn, connect

RETAINED = frozenset({State.CUT_OVER, State.PURGING})  # the source copy kept until its purge


def _read(dsn: str) -> Conn:
    c = connect(dsn, autocommit=True)
    c.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    return c


def _has(c: Conn, name: str) -> bool:
    return c.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def _owners(c: Conn, ctx: Context, table: str) -> Counter[str]:
    """Each owner of the table's rows on this side, with how many rows."""
    own = sqlgen.ownership(ctx.spec.entity_graph, table)
    q = sql.SQL("SELECT ({})::text, count(*) FROM {} GROUP BY 1").format(own.owner, own.from_)
    return Counter({k: n for k, n in c.execute(q)})


class _Control:
    """What the audit reads from the control database, once."""

    def __init__(self, c: Conn, since: datetime | None, source: str):
        self.homes: dict[str, set[str]] = {}
        for key, home in c.execute(f"SELECT user_key, home FROM {SCHEMA}.directory"):
            self.homes.setdefault(home, set()).add(key)
        self.shards: dict[str, tuple[State, str, dict | None]] = {}
        self.created: dict[str, datetime] = {}
        for sid, state, region, frozen, created in c.execute(
            f"SELECT shard_id, state, region, frozen, created_at FROM {SCHEMA}.shard"
        ):
            self.shards[sid] = (State(state), region, frozen)
            self.created[sid] = created
        has_origin = c.execute(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'shard' AND column_name = 'origin')",
            (SCHEMA,),
        ).fetchone()[0]
        self.origins: dict[str, str] = dict.fromkeys(self.shards, source)  # where each shard's users move from
        if has_origin:
            self.origins.update(
                c.execute(f"SELECT shard_id, origin FROM {SCHEMA}.shard WHERE origin IS NOT NULL").fetchall()
            )
        self.users: dict[str, set[str]] = {}
        self.members: dict[str, dict[int, list[str]]] = {}
        for sid, key, b in c.execute(f"SELECT shard_id, user_key, batch_no FROM {SCHEMA}.shard_user"):
            self.users.setdefault(sid, set()).add(key)
            self.members.setdefault(sid, {}).setdefault(b, []).append(key)
        self.active = set(self.shards)
        if since is not None:  # the costly per-shard checks: shards with activity since
            self.active = {
                sid for (sid,) in c.execute(f"SELECT DISTINCT shard_id FROM {SCHEMA}.audit WHERE at >= %s", (since,))
            }
        self.receipts: dict[str, dict[str, Any]] = {
            sid: tables or {}
            for sid, tables in c.execute(
                f"SELECT DISTINCT ON (shard_id) shard_id, detail->'receipts'->'tables' FROM {SCHEMA}.audit "
                "WHERE detail->>'event' = 'purged' AND to_state = 'purged' ORDER BY shard_id, id DESC"
            )
        }

    def taken_back(self, sid: str) -> set[str]:
        """The shard's users that later shards take (or took) back to its origin."""
        origin, mine = self.origins[sid], self.users.get(sid, set())
        later = [s for s, (_, r, _) in self.shards.items() if r == origin and self.created[s] > self.created[sid]]
        return {u for s in later for u in self.users.get(s, ()) if u in mine}

    def of(self, states: frozenset[State], region: str | None = None, origin: str | None = None) -> set[str]:
        """The users of shards in these states (bound for `region`, moving from `origin`)."""
        return {
            u
            for sid, (state, r, _) in self.shards.items()
            if state in states and (region is None or r == region) and (origin is None or self.origins[sid] == origin)
            for u in self.users.get(sid, ())
        }


def _timeline(c: Conn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
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
    return timeline, waves


def _destination(
    c: Conn, ctx: Context, r: str, ctl: _Control, findings: list[dict], drift: list[dict]
) -> dict[str, Any]:
    g = ctx.spec.entity_graph
    homed = ctl.homes.get(r, set())
    in_flight = ctl.of(IN_FLIGHT, r)
    # users who moved on from here: their copy is kept until its purge, and what a purge
    # keeps stays (each checked against the freeze or the receipts below)
    left = ctl.of(RETAINED | {State.PURGED}, origin=r)
    per: dict[str, int] = {}
    flying: dict[str, int] = {}
    rows: dict[str, Counter[str]] = {}
    for t in ctx.tables:
        rows[t] = _owners(c, ctx, t)
        owners = set(rows[t])
        per[t] = len(owners)
        stray = owners - homed - in_flight - left
        if stray:
            findings.append({"kind": "stray rows at a destination", "region": r, "table": t, "users": len(stray)})
        moving = owners & (in_flight - homed)
        if moving:
            flying[t] = len(moving)
        if t == g.root.table and homed - owners:
            findings.append(
                {"kind": "users homed here without their row", "region": r, "table": t, "users": len(homed - owners)}
            )
    away = _homed_away(c, ctx, r, homed - ctl.of(IN_FLIGHT, origin=r))
    for to, n in sorted(away.items()):
        findings.append({"kind": "users homed outside their policy's region", "region": r, "to": to, "users": n})
    n_manifests = _manifests(c, ctx, r, ctl, homed, findings, drift)
    found, _ = _left_behind(c, ctx, r, ctl, rows, drift)
    findings += found
    return {"users_homed": len(homed), "users_with_rows": per, "users_in_flight": flying, "manifests": n_manifests}


def _manifests(
    c: Conn, ctx: Context, r: str, ctl: _Control, homed: set[str], findings: list[dict], drift: list[dict]
) -> int:
    """The manifests kept at `r` (`c` reads it) against the shards moved there; how many."""
    moved_here = {sid for sid, (state, region, _) in ctl.shards.items() if state in MOVED and region == r}
    members = {sid: m for sid, m in ctl.members.items() if sid in ctl.active}
    for sid in sorted(moved_here & set(members)):
        if not ctl.users.get(sid, set()) <= homed:  # a later move took some of its users on
            del members[sid]
            drift.append(
                {
                    "kind": "users moved on since the manifest: its digests no longer describe them",
                    "region": r,
                    "shard": sid,
                }
            )
    for batches in members.values():
        for b in batches:
            batches[b] = ctx.sort_keys(batches[b])
    n_manifests, found = evidence.check(c, ctx, r, members, moved_here, drift)
    findings += found
    return n_manifests


def _homed_away(c: Conn, ctx: Context, r: str, homed: set[str]) -> Counter[str]:
    """Users homed at `r` whose residency, read here where they write it, the policy sends
    to another region: how many, by that region. A residency the policy does not place
    keeps the user where they are."""
    g = ctx.spec.entity_graph
    q = sql.SQL("SELECT {}::text, {}::text FROM {}.{}").format(
        sql.Identifier(g.root.key),
        sql.Identifier(g.root.residency),
        sql.Identifier(g.schema_),
        sql.Identifier(g.root.table),
    )
    out: Counter[str] = Counter()
    for key, residency in c.execute(q):
        to = ctx.spec.region_of(residency)
        if key in homed and to is not None and to != r:
            out[to] += 1
    return out


def _source(ctx: Context, ctl: _Control, findings: list[dict], drift: list[dict]) -> dict[str, Any]:
    spec = ctx.spec
    src = spec.source_region
    elsewhere = {u for r, us in ctl.homes.items() if r != src for u in us}
    retained, purged = ctl.of(RETAINED, origin=src), ctl.of(frozenset({State.PURGED}), origin=src)
    kept_rows: dict[str, Counter[str]] = {}
    with _read(ctx.source_dsn) as c:
        for t in ctx.tables:
            owners = _owners(c, ctx, t)
            kept_rows[t] = owners
            stray = set(owners) & (elsewhere - retained - purged)
            if stray:
                findings.append({"kind": "stray rows at the source", "region": src, "table": t, "users": len(stray)})
        found, frozen_checked = _left_behind(c, ctx, src, ctl, kept_rows, drift)
        findings += found
        # users who moved back here: their shards' manifests, where the spec keeps them here
        n_manifests = _manifests(c, ctx, src, ctl, ctl.homes.get(src, set()), findings, drift)
        side = f"source {src}"  # a table the spec forgot holds users' rows at the old home
        findings += [
            {"kind": "table left behind", "detail": why} for why in catalog.unnamed_tables(c, spec.entity_graph, side)
        ]
    return {
        "users_retained": len(retained),
        "copies_checked_against_their_freeze": frozen_checked,
        "manifests": n_manifests,
    }


def _left_behind(
    c: Conn, ctx: Context, r: str, ctl: _Control, rows: dict[str, Counter[str]], drift: list[dict]
) -> tuple[list[dict], int]:
    """At `r`, what the shards that moved users away from it left: each purged one's rows
    against its receipts, each cut-over one's copy against the cutover's freeze (`c` reads
    `r`; `rows` are its owners per table). The findings, and how many copies were checked."""
    out: list[dict] = []
    for sid, tables in sorted(ctl.receipts.items()):
        if ctl.shards.get(sid, (None,))[0] == State.PURGED and ctl.origins[sid] == r:
            back = ctl.taken_back(sid)  # their rows there are a later shard's now
            out += _against_receipt(c, ctx, r, sid, tables, ctl.users.get(sid, set()) - back, rows, bool(back))
    frozen_checked = 0
    for sid, (state, _, frozen) in sorted(ctl.shards.items()):
        if state == State.CUT_OVER and frozen and sid in ctl.active and ctl.origins[sid] == r:
            frozen_checked += 1
            then = CopyDigest.from_record(frozen)
            try:
                changed = then.differing(digest_copy(ctx, sid, ctx.dsn(r), like=then))
            except ColumnsGone:
                drift.append({"kind": "schema changed since the freeze: a column it hashed is gone", "shard": sid})
                continue
            for t in changed:
                out.append(
                    {
                        "kind": "the source copy changed since the cutover froze it",
                        "region": r,
                        "shard": sid,
                        "table": t,
                    }
                )
    return out, frozen_checked


def _against_receipt(
    c: Conn,
    ctx: Context,
    r: str,
    sid: str,
    tables: dict[str, Any],
    users: set[str],
    rows: dict[str, Counter[str]],
    some_back: bool = False,
) -> list[dict]:
    """A purged shard's rows at its origin `r` against what its purge did, table by table.
    With `some_back`, some of its users were taken back there since (left out of `users`):
    a kept table holds at most what the purge kept, no longer exactly that."""
    out: list[dict] = []
    where = {"region": r, "shard": sid}
    for t, done in sorted(tables.items()):
        if t not in ctx.tables:
            continue
        action, here = done.get("action"), rows.get(t, Counter())
        if action == "delete":
            back = users & set(here)
            if back:
                out.append({"kind": "purged users' rows back at the source", **where, "table": t, "users": len(back)})
        elif action == "keep":
            now = sum(here[u] for u in users)
            if now > done.get("rows_kept", 0) if some_back else now != done.get("rows_kept"):
                out.append(
                    {
                        "kind": "a kept table's rows differ from the purge's receipt",
                        **where,
                        "table": t,
                        "rows": now - done.get("rows_kept", 0),
                    }
                )
        elif action == "pseudonymise":
            own = sqlgen.ownership(ctx.spec.entity_graph, t)
            for col in done.get("columns", []):
                typ = ctx.tables[t].column(col).type
                q = sql.SQL("SELECT ({})::text, t0.{}::text FROM {}").format(own.owner, sql.Identifier(col), own.from_)
                bad = sum(1 for k, v in c.execute(q) if k in users and not pseudonym.is_pseudonym(typ, v))
                if bad:
                    out.append(
                        {
                            "kind": "original values in a pseudonymised column",
                            **where,
                            "table": t,
                            "column": col,
                            "rows": bad,
                        }
                    )
    return out


def run(ctx: Context, since: datetime | None = None) -> dict[str, Any]:
    """The audit's document. With `since`, the costly per-shard checks (manifests' digests
    recomputed from the destination, source copies against their freeze) cover only shards
    with audit activity since then; the chain and the residency checks always cover
    everything."""
    spec, g = ctx.spec, ctx.spec.entity_graph
    findings: list[dict[str, Any]] = []
    drift: list[dict[str, Any]] = []
    with _read(spec.control.url) as c:
        if not _has(c, f"{SCHEMA}.directory"):
            return {"command": "audit", "ok": True, "note": "nothing migrated yet", "findings": []}
        ctl = _Control(c, since, spec.source_region)
        timeline, waves = _timeline(c)
        for e in timeline:
            e["from"] = ctl.origins.get(e["shard_id"], spec.source_region)
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
    for r in spec.targets:
        with _read(ctx.dsn(r)) as c:
            if _has(c, "migrator.audit_heads"):
                heads[r] = [(s, h) for s, h in c.execute("SELECT seq, sha256 FROM migrator.audit_heads ORDER BY seq")]
            regions[r] = _destination(c, ctx, r, ctl, findings, drift)
    source = _source(ctx, ctl, findings, drift)
    checked_chain: dict[str, Any] = (
        chain.verify(rows, heads)
        if has_chain
        else {"ok": False, "findings": [{"kind": "the control database has no audit chain (run `migrator upgrade`)"}]}
    )
    findings = checked_chain["findings"] + findings
    purged = ctl.of(frozenset({State.PURGED}))
    return {
        "command": "audit",
        "ok": not findings,
        "chain": {k: v for k, v in checked_chain.items() if k != "findings"}
        | {"heads": {r: len(h) for r, h in heads.items()}},
        "residency": {"regions": regions, "source": source, "purged_users": len(purged)},
        "timeline": timeline,
        "waves": waves,
        "since": since.isoformat() if since else None,
        "excluded_tables": [{"table": x.table, "reason": x.reason} for x in g.exclude],
        "drift": drift,
        "findings": findings,
    }
