"""The audit trail as a hash chain, and its head kept in the destination regions.

An audit row is written inside the transaction whose move it records (`Control.audit`)
and sealed after it commits: `seal` gives every committed row not yet sealed its place in
the chain (`seq`), the canonical text of its content (`content`: the row's columns as one
JSON document, as PostgreSQL prints jsonb, with the time in UTC to the microsecond), the
SHA-256 of the previous row and its own, SHA-256(previous + "\\n" + content). Rows are
sealed in the order of their writers' transactions and only below the oldest transaction
still running, so a row whose transaction commits late is never passed over (as with the
change log); sealing takes no lock a writer waits on.

After every phase a shard goes through (a move or not) the chain's head (seq, sha256) is
written into the destination region the shard concerns (`publish`), so the tail a head
does not cover is at most what was written since the last phase ended; `verify` recomputes every hash from the
stored content, checks the content against the row's columns and each published head
against the chain: a row changed, removed or reordered, or history rewritten before a
published head, is found and named by its place in the chain, never by its content.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from psycopg import errors as pge
from psycopg import sql

from migrator.control.store import SCHEMA, Control
from migrator.errors import describe
from migrator.schema import history
from migrator.stores.postgres import connect

log = logging.getLogger("migrator.evidence.chain")

CONTENT = (
    "jsonb_build_object('id', id, 'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "
    "'run_id', run_id, 'shard_id', shard_id, 'from_state', from_state, 'to_state', to_state, 'detail', detail)::text"
)
HORIZON = (
    "SELECT coalesce((SELECT min(x) FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE x <> pg_current_xact_id()), "
    "pg_snapshot_xmax(pg_current_snapshot()))::text"
)


def link(prev: str | None, content: str) -> str:
    return hashlib.sha256(f"{prev or ''}\n{content}".encode()).hexdigest()


def seal(ctl: Control) -> int:
    """Seal every committed audit row below the horizon; returns how many were sealed."""
    with ctl.connect() as c:
        c.execute("SELECT pg_advisory_xact_lock(hashtext('migrator:audit-seal'))")
        horizon = c.execute(HORIZON).fetchone()[0]
        last = c.execute(f"SELECT seq, sha256 FROM {SCHEMA}.audit WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1")
        row = last.fetchone()
        seq, prev = (row[0], row[1]) if row else (0, None)
        todo = c.execute(
            f"SELECT id, {CONTENT} FROM {SCHEMA}.audit WHERE seq IS NULL AND xid < %s::xid8 ORDER BY xid, id",
            (horizon,),
        ).fetchall()
        out = []
        for rid, content in todo:
            seq += 1
            sha = link(prev, content)
            out.append((seq, content, prev, sha, rid))
            prev = sha
        if out:
            with c.cursor() as cur:
                cur.executemany(
                    f"UPDATE {SCHEMA}.audit SET seq = %s, content = %s, prev_sha256 = %s, sha256 = %s WHERE id = %s",
                    out,
                )
    return len(out)


def head(ctl: Control) -> tuple[int, str] | None:
    with ctl.connect(autocommit=True) as c:
        row = c.execute(f"SELECT seq, sha256 FROM {SCHEMA}.audit WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1")
        found = row.fetchone()
    return (found[0], found[1]) if found else None


def publish(ctl: Control, dsn: str, sid: str, event: str) -> tuple[int, str] | None:
    """Seal, then write the chain's head into the destination at `dsn`."""
    seal(ctl)
    h = head(ctl)
    if h is None:
        return None
    values = sql.SQL(", ").join(map(sql.Literal, (h[0], h[1], sid, event)))
    insert = sql.SQL("INSERT INTO migrator.audit_heads (seq, sha256, shard_id, event) {} ON CONFLICT (seq) DO NOTHING")
    # one connection, one statement where the destination's ledger tables are at their
    # schema head (it may be an ocean away); the schema brought there first otherwise
    at_head = sql.SQL(
        "WITH v AS (SELECT version_num = {} AS ok FROM {}.{}), i AS ({}) SELECT bool_or(ok) FROM v"
    ).format(
        sql.Literal(history.LEDGER.head),
        sql.Identifier(SCHEMA),
        sql.Identifier(history.LEDGER.version_table),
        insert.format(sql.SQL("SELECT {} FROM v WHERE ok").format(values)),
    )
    with connect(dsn, autocommit=True) as c:
        try:
            (done,) = c.execute(at_head).fetchone()
        except (pge.UndefinedTable, pge.InvalidSchemaName):  # a destination without the ledger yet
            done = False
        if not done:
            history.ensure(dsn, history.LEDGER, c)
            c.execute(insert.format(sql.SQL("VALUES ({})").format(values)))
    return h


def publish_quietly(ctl: Control, dsn: str, sid: str, event: str) -> None:
    """`publish`, logging rather than raising: the move it records has happened already, and
    the next cutover, rollback or purge publishes a later head."""
    try:
        publish(ctl, dsn, sid, event)
    except Exception as exc:  # noqa: BLE001 - evidence must not undo a finished move
        log.warning("shard %s: the audit chain's head was not written to its region now: %s", sid, describe(exc))


def _at(v: datetime) -> str:
    return v.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def verify(rows: list[dict[str, Any]], heads: dict[str, list[tuple[int, str]]]) -> dict[str, Any]:
    """Check a chain (audit rows as dicts, any order) and the heads published per region;
    returns {"ok", "sealed", "unsealed", "findings"}. Findings name a place in the chain,
    never a row's content."""
    findings: list[dict[str, Any]] = []
    sealed = sorted((r for r in rows if r["seq"] is not None), key=lambda r: r["seq"])
    by_seq = {r["seq"]: r for r in sealed}
    prev = None
    for i, r in enumerate(sealed, start=1):
        where = {"seq": r["seq"], "audit_id": r["id"]}
        if r["seq"] != i:
            findings.append({"kind": "audit row missing or reordered", "expected_seq": i, **where})
            break
        if r["prev_sha256"] != prev:
            findings.append({"kind": "audit chain broken (previous hash differs)", **where})
        if link(r["prev_sha256"], r["content"]) != r["sha256"]:
            findings.append({"kind": "audit row changed (its hash differs)", **where})
        try:
            c = json.loads(r["content"])
            same = (
                c["id"] == r["id"]
                and c["at"] == _at(r["at"])
                and c["run_id"] == r["run_id"]
                and c["shard_id"] == r["shard_id"]
                and c["from_state"] == r["from_state"]
                and c["to_state"] == r["to_state"]
                and c["detail"] == r["detail"]
            )
        except (ValueError, KeyError, TypeError):
            same = False
        if not same:
            findings.append({"kind": "audit row changed (its columns differ from what was sealed)", **where})
        prev = r["sha256"]
    for region, hs in sorted(heads.items()):
        for seq, sha in hs:
            got = by_seq.get(seq)
            if got is None or got["sha256"] != sha:
                findings.append(
                    {"kind": "audit history rewritten before a head kept in the region", "region": region, "seq": seq}
                )
    unsealed = [r["id"] for r in rows if r["seq"] is None]
    covered = max((seq for hs in heads.values() for seq, _ in hs), default=0)
    return {
        "ok": not findings,
        "sealed": len(sealed),
        "unsealed": len(unsealed),
        "after_last_head": max(0, len(sealed) - covered),  # sealed rows no head kept in a region covers yet
        "findings": findings,
    }
