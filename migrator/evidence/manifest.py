"""Signed manifests: at every cutover, rollback and purge, one canonical JSON document per
shard, signed with its destination region's Ed25519 key and kept in that region (its
database, and beside its objects when the spec has object stores), so it can be handed to
an auditor: users appear only as keyed pseudonyms (HMAC-SHA256 under the region's
pseudonym key), rows only as counts and digests.

The document: format, tool and digest versions, wave, shard, region, run, event and state,
the policy's digest, per table the destination's row count and digest (SHA-256 over each
batch's count and sum of row hashes, the verifier's digest), the objects' count and
manifest digest, the last fence window, the purge receipts when there are any, time.
Canonical: keys sorted, no spaces, UTF-8. `check` recomputes the destination's digests from
the store and verifies each latest manifest's signature with the region's public key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import migrator
from migrator.control.context import Context
from migrator.errors import MigratorError
from migrator.schema import history
from migrator.shard import objects
from migrator.stores import s3, sqlgen
from migrator.stores.postgres import Conn, connect

FORMAT = 1
DIGEST_VERSION = 1


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _env_key(name: str, what: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise MigratorError(f"{what}: environment variable {name} is not set where this worker runs")
    return value


def table_digests(
    c: Conn, ctx: Context, batch_users: dict[int, list[str]], columns: dict[str, list[str]] | None = None
) -> dict[str, dict[str, Any]]:
    """Per table: rows, SHA-256 over each batch's (count, sum of row hashes) at one side, and
    the columns hashed. With `columns`, only those tables, over those of their columns."""
    out: dict[str, dict[str, Any]] = {}
    g, kt = ctx.spec.entity_graph, ctx.key_type
    for name, table in ctx.tables.items():
        if columns is not None:
            if name not in columns:
                continue
            table = replace(table, columns=tuple(col for col in table.columns if col.name in columns[name]))
        lines, rows = [], 0
        q = sqlgen.digest_keys(g, table, kt)
        for b in sorted(batch_users):
            n, s = c.execute(q, sqlgen.keys_arg(batch_users[b])).fetchone()
            rows += n
            lines.append(f"{b}|{n}|{s}")
        out[name] = {
            "rows": rows,
            "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            "columns": table.names,
        }
    return out


def _same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    return a is not None and b is not None and (a["rows"], a["sha256"]) == (b["rows"], b["sha256"])


def build(ctx: Context, sid: str, event: str) -> dict[str, Any]:
    ctl = ctx.control
    shard = ctl.shard(sid)
    region = shard.region
    ev = ctx.spec.evidence
    assert ev is not None and region in ev.regions
    batches = ctl.batch_keys(sid, ctx.sort_keys)  # each batch's keys read once, in turn
    batch_users = {b: batches[b] for b in batches}
    with connect(ctx.dsn(region), autocommit=True) as c:
        tables = table_digests(c, ctx, batch_users)
    users: list[str] = []
    keyref = ev.regions[region].pseudonym
    if keyref is not None:
        key = _env_key(keyref.env, f"the evidence pseudonym key of region {region}").encode()
        users = sorted(
            hmac.new(key, u.encode(), hashlib.sha256).hexdigest() for keys in batch_users.values() for u in keys
        )
    detail: dict[str, Any] = {}
    for row in ctl.audit_rows(sid):
        d = row["detail"]
        if d.get("event") == "fence closed":
            detail["fence_ms"] = d.get("fence_ms")
        if d.get("event") == "purged":
            detail["purge"] = d.get("receipts")
    doc: dict[str, Any] = {
        "format": FORMAT,
        "digest_version": DIGEST_VERSION,
        "tool_version": migrator.__version__,
        "wave": shard.wave,
        "shard": shard.name,
        "shard_id": sid,
        "region": region,
        "run_id": ctl.run_id,
        "event": event,
        "state": shard.state.value,
        "policy_sha256": hashlib.sha256(canonical(dict(ctx.spec.policy))).hexdigest(),
        "tables": tables,
        "users": {"count": len(users) or shard.users, "pseudonyms": users},
        "at": datetime.now(UTC).isoformat(),
        **detail,
    }
    manifest = objects.manifest(ctx, sid)
    if manifest:
        entries = [e for es in manifest.values() for e in es]
        doc["objects"] = {"count": len(entries), "manifest_sha256": objects.manifest_digest(entries)}
    return doc


def sign(doc: dict[str, Any], seed_hex: str) -> str:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)).sign(canonical(doc)).hex()


def public_key(seed_hex: str) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)).public_key()
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def write(ctx: Context, sid: str, event: str) -> dict[str, Any] | None:
    """Build, sign and keep the shard's manifest in its region (None when the spec asks for none)."""
    ev = ctx.spec.evidence
    region = ctx.control.shard(sid).region
    if ev is None or region not in ev.regions:
        return None
    doc = build(ctx, sid, event)
    seed = _env_key(ev.regions[region].signing.env, f"the evidence signing key of region {region}")
    signature = sign(doc, seed)
    dsn = ctx.dsn(region)
    history.ensure(dsn, history.LEDGER)
    with connect(dsn) as c:
        mid = c.execute(
            "INSERT INTO migrator.manifests (shard_id, event, doc, signature) VALUES (%s, %s, %s, %s) RETURNING id",
            (sid, event, canonical(doc).decode(), signature),
        ).fetchone()[0]
    if objects.enabled(ctx):
        store = objects.settings(ctx).stores[region]
        client = s3.client(store)
        key = f"evidence/{sid}/{mid:08d}-{event}.json"
        client.put_object(Bucket=store.bucket, Key=key, Body=canonical(doc))
        client.put_object(Bucket=store.bucket, Key=key + ".sig", Body=signature.encode())
    return {"manifest": mid, "signature": signature[:16]}


def owed(ctx: Context, sid: str, event: str) -> bool:
    """Whether the spec asks for manifests in the shard's region and the shard's latest
    manifest there is not one of `event` (none kept, or one from before its last move)."""
    ev = ctx.spec.evidence
    region = ctx.control.shard(sid).region
    if ev is None or region not in ev.regions:
        return False
    with connect(ctx.dsn(region)) as c:
        if c.execute("SELECT to_regclass('migrator.manifests')").fetchone()[0] is None:
            return True
        row = c.execute(
            "SELECT event FROM migrator.manifests WHERE shard_id = %s ORDER BY id DESC LIMIT 1", (sid,)
        ).fetchone()
    return row is None or row[0] != event


def check(
    c: Conn,
    ctx: Context,
    region: str,
    members: dict[str, dict[int, list[str]]],
    moved_here: set[str],
    drift: list[dict],
) -> tuple[int, list[dict]]:
    """The latest manifest of each shard kept in `region`: its signature under the region's
    public key, the shard and region it names, and the destination's digests now; and a
    manifest for every shard moved here (`moved_here`) where the spec asks for them.
    Returns (manifests checked, findings); a table that changed in a way the application
    or a schema change explains goes to `drift` instead (see `_changed`)."""
    ev = ctx.spec.evidence
    pub = ev.regions[region].public_key if ev and region in ev.regions else None
    kept = c.execute("SELECT to_regclass('migrator.manifests')").fetchone()[0] is not None
    latest = (
        c.execute(
            "SELECT DISTINCT ON (shard_id) shard_id, doc, signature FROM migrator.manifests ORDER BY shard_id, id DESC"
        ).fetchall()
        if kept
        else []
    )
    findings: list[dict] = []
    if ev is not None and region in ev.regions:
        for sid in sorted(moved_here - {row[0] for row in latest}):
            findings.append({"kind": "no manifest kept for a shard moved here", "region": region, "shard": sid})
    for sid, text, signature in latest:
        where = {"region": region, "shard": sid}
        if pub is None:
            findings.append({"kind": "no public key to check the region's manifests", **where})
        else:
            try:
                Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub)).verify(bytes.fromhex(signature), text.encode())
            except (InvalidSignature, ValueError):
                findings.append({"kind": "manifest signature invalid (changed, or signed with another key)", **where})
                continue
        doc = json.loads(text)
        if (doc.get("shard_id"), doc.get("region")) != (sid, region):
            findings.append({"kind": "manifest names another shard or region than where it is kept", **where})
            continue
        if sid not in members or doc.get("state") == "rolled_back":  # not asked for (--since), or moved back
            continue
        now = table_digests(c, ctx, members[sid])
        for t, want in sorted(doc.get("tables", {}).items()):
            if not _same(now.get(t), want):
                found = _changed(c, ctx, sid, t, want, now.get(t), members[sid])
                (drift if found.pop("drift") else findings).append({**found, **where, "table": t})
    return len(latest), findings


def _changed(
    c: Conn,
    ctx: Context,
    sid: str,
    table: str,
    want: dict[str, Any],
    now: dict[str, Any] | None,
    batch_users: dict[int, list[str]],
) -> dict[str, Any]:
    """Why a table's rows at the destination differ from its manifest, most benign first:

    * a schema change: the table's columns are not the ones the manifest hashed, and over
      those columns the rows are exactly as recorded (drift);
    * the application: it wrote the shard's users' rows of that table after cutover, as
      the destination's change log (kept until cleanup or purge) shows (drift);
    * unknown: the log is gone (cleanup or purge), so a write cannot be told from a
      change made past the application (drift, said as such);
    * tampering: the log is kept and holds no write of that table, so the change was made
      past the guard (a finding)."""
    recorded = want.get("columns")
    if recorded and now is not None and recorded != now["columns"]:
        if not set(recorded) <= set(now["columns"]):
            return {"kind": "schema changed since the manifest: a column it hashed is gone", "drift": True}
        again = table_digests(c, ctx, batch_users, {table: recorded}).get(table)
        if again is not None and again["columns"] == recorded and _same(again, want):
            return {"kind": "schema changed since the manifest; rows as recorded", "drift": True}
    logged = c.execute(
        "SELECT to_regclass('migrator.capture_users') IS NOT NULL AND EXISTS "
        "(SELECT 1 FROM migrator.capture_users WHERE shard_id = %s)",
        (sid,),
    ).fetchone()[0]
    if not logged:
        return {
            "kind": "changed since the manifest; the destination no longer logs writes, so not told apart",
            "drift": True,
        }
    written = c.execute(
        "SELECT count(DISTINCT pk) FROM migrator.changes WHERE shard_id = %s AND tbl = %s", (sid, table)
    ).fetchone()[0]
    if written:
        return {"kind": "the application wrote after cutover", "rows_written": written, "drift": True}
    return {
        "kind": "destination rows differ from the shard's manifest, and no logged write explains it",
        "drift": False,
    }
