"""Retiring the source copy of a cut-over shard: the point of no return.

Preconditions, checked before anything is touched (`PurgeRefused` or `ChecksumMismatch`
otherwise): the shard is cut over for at least `purge.after`; no table holding users' rows
is left unnamed; the source copy, re-read now, is exactly what the cutover froze (the
digest kept beside the state: the application's writes at the new home since are none of
its business) and every user is still homed at the destination with their row there; the
key of its region is available where a table is pseudonymised. Objects are checked against
the manifest at the destination batch by batch before their source copy goes.

Then, batch by batch (the copy's batches): the users' objects at the source are deleted
once their destination bytes match the manifest, and in one source transaction every
table of the graph, children first, loses the users' rows (`delete`) or has the listed
columns replaced by keyed pseudonyms (`pseudonymise`, see `pseudonym`), or is left as it
is (`keep`); the transaction also writes the batch's receipt into the source's purge
ledger, so a batch is purged whole or not at all and a resumed purge starts at the next.
The migrator's own session passes the guard triggers (`migrator.apply`); the source
fence stays held, so the database keeps refusing any write that would give a moved user
rows at the source again.

The shard moves cut_over -> purging (from which rollback is refused) -> purged, with the
receipts (per table rows deleted and pseudonymised, object keys deleted with a digest of
the key list, the frozen digest checked, times, run id) in the audit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from migrator import capture, hooks
from migrator.control.context import Context
from migrator.control.state import State
from migrator.control.store import Shard
from migrator.errors import PurgeRefused
from migrator.evidence import pseudonym
from migrator.lanes import in_lanes
from migrator.phases import purge_objects
from migrator.phases.purge_checks import Checked, count_rows, is_due, key_of, preconditions, settings, taken_back
from migrator.schema import history
from migrator.shard import objects
from migrator.shard.digest import CopyDigest
from migrator.stores import replica, sqlgen
from migrator.stores.catalog import Table
from migrator.stores.postgres import Conn, connect

log = logging.getLogger("migrator.phases.purge")

Progress = Callable[[int, int], None]


def _order(ctx: Context) -> list[Table]:
    """The graph's tables, children first (the order rows go in)."""
    return [ctx.tables[n] for n in reversed(list(ctx.tables))]


def _pseudonymise(c: Conn, ctx: Context, table: Table, cols: list[str], keys: list[str], key: bytes) -> int:
    """Replace `cols` of the users' rows of `table` with their pseudonyms; returns rows changed.

    Each column's distinct values come to the worker (a user's address recurs across their
    logins), are keyed here (the key never reaches the source) and go back as a map in a
    temporary table that one UPDATE reads."""
    g, kt, arg = ctx.spec.entity_graph, ctx.key_type, sqlgen.keys_arg(keys)
    stages: dict[str, str] = {}
    for i, col in enumerate(cols):
        values = [v for (v,) in c.execute(sqlgen.distinct_values(g, table, col, kt), arg)]
        if not values:
            continue  # no value to replace: NULL stays NULL
        make = pseudonym.pseudonymiser(key, table.column(col).type)
        stage = stages[col] = f"rm_pseudonyms_{i}"
        # v: the value as text; p: its pseudonym, of the column's own type
        c.execute(
            sql.SQL(
                "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT t.{}::text AS v, t.{} AS p FROM {}.{} AS t WHERE false"
            ).format(
                sql.Identifier(stage),
                sql.Identifier(col),
                sql.Identifier(col),
                sql.Identifier(g.schema_),
                sql.Identifier(table.name),
            )
        )
        with c.cursor().copy(sql.SQL("COPY {} (v, p) FROM STDIN").format(sql.Identifier(stage))) as cp:
            for v in values:
                cp.write_row((v, make(v)))
        c.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (v)").format(sql.Identifier(stage)))
        c.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(stage)))
    if not stages:
        return count_rows(c, ctx, table, keys)
    changed = c.execute(sqlgen.replace_values(g, table, stages, kt), arg).rowcount
    for stage in stages.values():
        c.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(stage)))
    return changed


def _purge_rows(
    c: Conn, ctx: Context, keys: list[str], key: bytes | None, rep: replica.Replica
) -> dict[str, dict[str, Any]]:
    p = settings(ctx)
    out: dict[str, dict[str, Any]] = {}
    for table in _order(ctx):
        action = p.action(table.name)
        replica.set_for(c, rep, table.name)
        if action == "delete":
            n = c.execute(sqlgen.delete_keys(ctx.spec.entity_graph, table, ctx.key_type), sqlgen.keys_arg(keys))
            out[table.name] = {"action": "delete", "rows_deleted": n.rowcount}
        elif action == "pseudonymise":
            assert key is not None
            cols = p.columns(table.name)
            n_rows = _pseudonymise(c, ctx, table, cols, keys, key)
            out[table.name] = {"action": "pseudonymise", "rows_pseudonymised": n_rows, "columns": cols}
        else:
            out[table.name] = {"action": "keep", "rows_kept": count_rows(c, ctx, table, keys)}
    return out


@dataclass(frozen=True)
class WouldPurge:
    """The purge's dry run: its checks, and per table what it would delete, pseudonymise
    and keep (`action`, `rows`, `columns`), and how many objects."""

    shard_id: str
    checked: Checked
    tables: Mapping[str, Mapping[str, Any]]
    objects: int

    def summary(self) -> dict[str, Any]:
        plan = {"tables": self.tables, "objects": self.objects}
        return {"shard_id": self.shard_id, "would_purge": plan, **self.checked.record()}


@dataclass(frozen=True)
class Purged:
    """A finished purge: its receipts added up over the batches (per table what was done;
    the objects deleted and their keys' digest), and how many batches."""

    receipts: Mapping[str, Any]
    batches: int


def _plan_only(ctx: Context, sid: str) -> tuple[dict[str, dict[str, Any]], int]:
    """What a purge would delete and pseudonymise, per table, without writing anything."""
    p = settings(ctx)
    totals: dict[str, dict[str, Any]] = {}
    shard = ctx.control.shard(sid)
    back = taken_back(ctx, shard)
    with connect(ctx.origin_dsn(shard), autocommit=True) as c:
        for batch in ctx.control.batch_keys(sid, ctx.sort_keys).values():
            keys = [k for k in batch if k not in back]
            for table in _order(ctx):
                n = count_rows(c, ctx, table, keys)
                t = totals.setdefault(table.name, {"action": p.action(table.name), "rows": 0})
                t["rows"] += n
                if p.columns(table.name):
                    t["columns"] = p.columns(table.name)
    n_objects = sum(len(v) for v in objects.manifest(ctx, sid).values())
    return totals, n_objects


def would_purge(ctx: Context, sid: str) -> WouldPurge:
    """The purge's dry implementation (the dispatcher has said it would run): its
    preconditions checked, and what it would delete, pseudonymise and keep. A purge already
    under way is not planned again: its rerun finishes it."""
    shard = ctx.control.shard(sid)
    if shard.state != State.CUT_OVER:
        raise PurgeRefused(f"shard {sid} is {shard.state}; only a cut-over shard can be purged")
    checked = preconditions(ctx, sid)
    tables, n_objects = _plan_only(ctx, sid)
    return WouldPurge(sid, checked, tables, n_objects)


def _purge_batch(
    ctx: Context,
    sid: str,
    region: str,
    origin: str,
    b: int,
    keys: list[str],
    manifest: list[tuple[str, int, str]],
    key: bytes | None,
    rep: replica.Replica,
) -> dict[str, Any]:
    """The batch's objects at its origin, then its rows and receipt in one transaction there."""
    deleted_keys, gone_there = purge_objects.purge_batch(ctx, sid, region, origin, manifest) if manifest else ([], 0)
    if gone_there:
        log.warning("shard %s batch %d: %d object(s) purged that %s no longer holds", sid, b, gone_there, region)
    with connect(ctx.dsn(origin)) as c:
        # one snapshot for the batch: the values keyed are exactly those its UPDATEs replace
        # (the fence already keeps the users' rows still; a conflict would be a retried
        # serialization failure, never a value replaced by NULL)
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        c.execute(capture.APPLY)
        c.execute("SET LOCAL lock_timeout = '5s'")
        tables = _purge_rows(c, ctx, keys, key, rep)
        receipt = {
            "tables": tables,
            "objects_deleted": len(deleted_keys),
            "objects_not_at_destination": gone_there,  # the application's deletes there, or a loss: counted
            "objects_digest": purge_objects.keys_digest(deleted_keys),
        }
        c.execute(
            "INSERT INTO migrator.purge_ledger (shard_id, batch_no, receipt) VALUES (%s, %s, %s)",
            (sid, b, json.dumps(receipt)),
        )
    return receipt


def purge_shard(ctx: Context, sid: str, progress: Progress | None = None) -> Purged:
    """Purge one cut-over (or partly purged) shard; the caller holds its lock."""
    ctl = ctx.control
    shard = ctl.shard(sid)
    src = ctx.origin_dsn(shard)
    if shard.state == State.CUT_OVER:
        checked = preconditions(ctx, sid)
        ctl.move(sid, State.CUT_OVER, State.PURGING, {"event": "purge started", **checked.record()})
    key = key_of(ctx, shard.region)
    history.ensure(src, history.CAPTURE)
    rep = replica.of(src, ctx.spec.entity_graph, f"source {ctx.origin(shard)}", ctx.spec.copy_.skip_edge_checks)
    with connect(src, autocommit=True) as c:
        done = {
            b: r
            for b, r in c.execute("SELECT batch_no, receipt FROM migrator.purge_ledger WHERE shard_id = %s", (sid,))
        }
    shard = ctl.shard(sid)
    back = taken_back(ctx, shard)  # users a later shard took back there: theirs now
    later = CopyDigest.from_record(shard.frozen).without if shard.frozen is not None else ()
    manifest = purge_objects.without_returned(ctx, objects.manifest(ctx, sid), back, later)
    batches = ctl.batch_keys(sid, ctx.sort_keys)
    total = len(batches)
    pause = settings(ctx).batch_pause_s
    pending = [b for b in sorted(batches) if b not in done]

    def one(_: None, b: int) -> dict[str, Any]:
        keys = [k for k in batches[b] if k not in back]
        receipt = _purge_batch(ctx, sid, shard.region, ctx.origin(shard), b, keys, manifest.get(b, []), key, rep)
        hooks.point("purged batch", ctx, sid)
        if pause:
            time.sleep(pause)  # this lane's pause: the source's own writers go first
        return receipt

    # Batches hold disjoint users, each purged in its own source transaction with its
    # receipt: lanes as the copy's.
    for b, receipt in in_lanes(pending, one, ctx.spec.copy_.workers, "purge"):
        done[b] = receipt
        log.info("shard %s: purge batch %d committed (%d/%d)", sid, b, len(done), total)
        if progress:
            progress(len(done), total)
    receipts = _totals(done)
    capture.finalize(ctx, sid, src, ctx.dsn(shard.region))  # rollback is gone: stop capturing at the destination
    started = ctl.shard(sid).state_since  # purging since
    detail = {
        "event": "purged",
        "receipts": receipts,
        "batches": len(done),
        "started_at": started.isoformat() if started else None,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    ctl.move(sid, State.PURGING, State.PURGED, detail)
    return Purged(receipts, len(done))


def _totals(done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    tables: dict[str, dict[str, Any]] = {}
    n_obj = gone = 0
    digests = []
    for b in sorted(done):
        r = done[b]
        n_obj += r["objects_deleted"]
        gone += r.get("objects_not_at_destination", 0)
        digests.append(r["objects_digest"])
        for t, v in r["tables"].items():
            acc = tables.setdefault(t, {k: (0 if isinstance(x, int) else x) for k, x in v.items()})
            for k, x in v.items():
                if isinstance(x, int):
                    acc[k] += x

    return {
        "tables": tables,
        "objects_deleted": n_obj,
        "objects_not_at_destination": gone,
        "objects_digest": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
    }


def select(ctx: Context, wave: str | None, names: list[str] | None, region: str | None) -> list[Shard]:
    """The shards a purge works on: those named (each then refused or purged, with the
    reason), or else every shard of any wave whose purge is unfinished or due."""
    ctl = ctx.control
    if names:
        return ctl.resolve(wave, names, region)
    if not ctl.exists():
        return []
    found = ctl.shards(wave=wave, region=region, states=[State.CUT_OVER, State.PURGING])
    return [s for s in found if s.state == State.PURGING or is_due(ctx, s.shard_id)]


def summary(ctx: Context, ids: list[str]) -> dict[str, Any]:
    """The purge receipts of these shards, added up (from the audit's `purged` rows)."""
    tables: dict[str, dict[str, int]] = {}
    out: dict[str, Any] = {"shards_purged": 0, "objects_deleted": 0, "tables": tables}
    for sid in ids:
        for row in ctx.control.audit_rows(sid):
            d = row["detail"]
            if d.get("event") != "purged":
                continue
            out["shards_purged"] += 1
            out["objects_deleted"] += d["receipts"]["objects_deleted"]
            for t, v in d["receipts"]["tables"].items():
                acc = tables.setdefault(t, {})
                for k, x in v.items():
                    if isinstance(x, int):
                        acc[k] = acc.get(k, 0) + x
    return out
