"""What a purge checks before it touches anything (`PurgeRefused`, `ChecksumMismatch` or a
spec problem otherwise), each check its own function: the purge section against the
source's tables, the retention, the region's key, no table holding users' rows left
unnamed, the source copy exactly as the cutover froze it, every user still homed at the
destination with their row there, and no row outside the graph that would make a delete
fail half-way."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg import sql

from migrator import capture
from migrator.control.context import Context
from migrator.control.state import State
from migrator.control.store import SCHEMA, Shard
from migrator.errors import ChecksumMismatch, PurgeRefused, SpecError
from migrator.evidence import pseudonym
from migrator.shard.digest import ColumnsGone, CopyDigest, digest_copy, left_out
from migrator.spec import Purge
from migrator.stores import catalog, sqlgen
from migrator.stores.catalog import Table
from migrator.stores.postgres import Conn, connect


def settings(ctx: Context) -> Purge:
    if ctx.spec.purge is None:
        raise SpecError("the spec has no purge section: say per table what is deleted, kept or pseudonymised")
    return ctx.spec.purge


def check_policy(ctx: Context) -> None:
    """The purge section against the source's tables: every pseudonymised column exists and
    has a type a pseudonym can take (exit 2 otherwise, naming the column)."""
    p = settings(ctx)
    for name in p.tables:
        table = ctx.tables[name]
        for col in p.columns(name):
            if col not in table.names:
                raise SpecError(f"purge.tables.{name}: source {ctx.spec.source_region} has no column {col}")
            why = pseudonym.unsupported(table.column(col).type)
            if why:
                raise SpecError(f"purge.tables.{name}.{col}: {why}")


def key_of(ctx: Context, region: str) -> bytes | None:
    """The region's pseudonymisation key, or None when no table needs one."""
    p = settings(ctx)
    if not any(p.action(t) == "pseudonymise" for t in ctx.tables):
        return None
    ref = p.keys.get(region)
    if ref is None:
        raise PurgeRefused(f"no pseudonymisation key for region {region}: add purge.keys.{region} to the spec")
    value = os.environ.get(ref.env, "")
    if len(value) < 16:
        raise PurgeRefused(
            f"the pseudonymisation key for region {region} (environment variable {ref.env}, purge.keys.{region}) "
            + ("is not set" if not value else "is shorter than 16 characters")
            + " where this worker runs"
        )
    return value.encode()


def due_at(ctx: Context, sid: str) -> datetime:
    p = settings(ctx)
    shard = ctx.control.shard(sid)
    at = shard.state_since if shard.state == State.CUT_OVER else None
    if at is None:
        raise PurgeRefused(f"shard {sid}: no cutover recorded")
    due = at.timestamp() + p.after_s
    if time.time() < due:
        when = datetime.fromtimestamp(due, UTC).isoformat(timespec="seconds")
        raise PurgeRefused(
            f"shard {sid} cut over at {at.isoformat(timespec='seconds')}; its retention "
            f"(purge.after {p.after}) ends at {when}: nothing purged"
        )
    return at


def count_rows(c: Conn, ctx: Context, table: Table, keys: list[str]) -> int:
    own = sqlgen.ownership(ctx.spec.entity_graph, table.name)
    return c.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {}").format(own.from_, sqlgen.keys_filter(own, ctx.key_type)),
        sqlgen.keys_arg(keys),
    ).fetchone()[0]


@dataclass(frozen=True)
class Checked:
    """What a purge checked before touching anything."""

    cut_over_at: str
    source_digest: str  # the source copy as the cutover froze it, found unchanged

    def record(self) -> dict[str, str]:
        return {"cut_over_at": self.cut_over_at, "source_digest": self.source_digest}


def preconditions(ctx: Context, sid: str) -> Checked:
    """Everything checked before a purge touches anything; returns what it found."""
    shard = ctx.control.shard(sid)
    check_policy(ctx)
    ctx.check_unnamed_tables()  # their rows would stay behind, or block a delete half-way
    cut_at = due_at(ctx, sid)
    key_of(ctx, shard.region)
    frozen = _frozen_copy_unchanged(ctx, shard)
    _still_at_destination(ctx, shard)
    _deletes_can_finish(ctx, shard)
    return Checked(cut_at.isoformat(), frozen.digest)


def _deletes_can_finish(ctx: Context, shard: Shard) -> None:
    """No row of a table the graph does not move (an excluded one, or one in another schema)
    points, by a foreign key that refuses deletes, at a row of the shard's users that the
    purge deletes: such a delete would fail half-way, past the point of no return."""
    g, p = ctx.spec.entity_graph, settings(ctx)
    deleted = [t for t in ctx.tables if p.action(t) == "delete"]
    if not deleted:
        return
    with connect(ctx.origin_dsn(shard), autocommit=True) as c:
        keys_of = catalog.blocking_keys(c, g, deleted)
        if not keys_of:
            return
        batches = ctx.control.batch_keys(shard.shard_id, ctx.sort_keys)
        for fk in keys_of:
            own = sqlgen.ownership(g, fk.parent)
            on = sql.SQL(" AND ").join(
                sql.SQL("x.{} = t0.{}").format(sql.Identifier(a), sql.Identifier(b))
                for a, b in zip(fk.columns, fk.parent_columns)
            )
            q = sql.SQL("SELECT count(*) FROM {} JOIN {}.{} x ON {} WHERE {}").format(
                own.from_,
                sql.Identifier(fk.schema),
                sql.Identifier(fk.table),
                on,
                sqlgen.keys_filter(own, ctx.key_type),
            )
            n = sum(c.execute(q, sqlgen.keys_arg(keys)).fetchone()[0] for keys in batches.values())
            if n:
                raise PurgeRefused(
                    f"shard {shard.shard_id}: {n} row(s) of {fk.schema}.{fk.table}, which the spec does not move, "
                    f"point at rows of {g.schema_}.{fk.parent} the purge deletes (foreign key {fk.name}, source "
                    f"{ctx.origin(shard)}): the deletes would fail half-way; keep or pseudonymise "
                    f"{fk.parent} in purge.tables, or move or clear those rows first: nothing purged"
                )


def _frozen_copy_unchanged(ctx: Context, shard: Shard) -> CopyDigest:
    """The source copy, re-read now, against the digest the cutover kept of it. A shard cut
    over without one (a version before it was kept, or a worker lost right after the flip)
    has its copy read now, which the source fence has kept still since the cutover."""
    sid = shard.shard_id
    then = CopyDigest.from_record(shard.frozen) if shard.frozen is not None else None
    try:
        now = digest_copy(ctx, sid, ctx.origin_dsn(shard), like=then)
    except ColumnsGone as exc:
        raise PurgeRefused(
            f"shard {sid}: its source copy cannot be compared with its freeze ({exc}): nothing purged"
        ) from None
    if then is None:
        if ctx.spec.changes.capture and capture.fences(ctx.origin_dsn(shard), sid).get(sid) != capture.HELD:
            raise PurgeRefused(
                f"shard {sid}: no digest of its source copy was kept at cutover and its source fence is not "
                "held, so the copy cannot be shown unchanged: nothing purged"
            )
        ctx.control.keep(sid, {"event": "source copy frozen", "digest": now.digest, "late": True}, frozen=now.record())
        return now
    changed = then.differing(now)
    if changed or then.digest != now.digest:
        raise ChecksumMismatch(
            f"shard {sid}: its source copy changed since the cutover froze it (tables {', '.join(changed)}), "
            "past the fence: nothing purged"
        )
    return now


def taken_back(ctx: Context, shard: Shard) -> frozenset[str]:
    """The shard's users whose rows at its origin a later shard replaced, taking them back
    there (those its freeze leaves out, see `move_back`): the purge leaves them be."""
    without = CopyDigest.from_record(shard.frozen).without if shard.frozen is not None else ()
    return frozenset(left_out(ctx, shard.shard_id, without))


def _still_at_destination(ctx: Context, shard: Shard) -> None:
    """Every user of the shard homed away from its origin (at its destination, or wherever a
    later move took them), with their row of the root table at that home: the copy about to
    be retired is not the only one. Users a later shard took back to the origin are that
    shard's business."""
    sid, g, origin = shard.shard_id, ctx.spec.entity_graph, ctx.origin(shard)
    back_home = taken_back(ctx, shard)
    with ctx.control.connect() as c:
        (back,) = c.execute(
            f"SELECT count(*) FROM {SCHEMA}.shard_user su LEFT JOIN {SCHEMA}.directory d USING (user_key) "
            f"WHERE su.shard_id = %s AND (d.home IS NULL OR d.home = %s) AND su.user_key <> ALL(%s)",
            (sid, origin, sorted(back_home)),
        ).fetchone()
    if back:
        raise PurgeRefused(
            f"shard {sid}: {back} of its users are not homed away from {origin} in the directory: nothing purged"
        )
    root = ctx.tables[g.root.table]
    keys = [k for batch in ctx.control.batch_keys(sid, ctx.sort_keys).values() for k in batch]
    by_home: dict[str, list[str]] = {}
    with ctx.control.connect(autocommit=True) as c:
        q = f"SELECT user_key, home FROM {SCHEMA}.directory WHERE user_key = ANY(%s)"
        for k, home in c.execute(q, (keys,)):
            if k not in back_home:
                by_home.setdefault(home, []).append(k)
    present = 0
    for home, ks in sorted(by_home.items()):  # one statement at each home: it may be an ocean away
        with connect(ctx.dsn(home), autocommit=True) as at:
            present += count_rows(at, ctx, root, ctx.sort_keys(ks))
    away = shard.users - len(back_home)
    if present < away:
        raise PurgeRefused(
            f"shard {sid}: {away - present} of its {away} users homed away have no row in {g.root.table} at "
            f"their home (destination {shard.region}, or where they moved on to): nothing purged"
        )


def next_due(ctx: Context) -> tuple[str, datetime] | None:
    """The cut-over shard whose retention ends first, and when; None when none waits."""
    if not ctx.control.exists():
        return None
    after = settings(ctx).after_s
    waiting = [
        (s.name if s.wave == "default" else s.shard_id, s.state_since + timedelta(seconds=after))
        for s in ctx.control.shards(states=[State.CUT_OVER])
        if s.state_since is not None
    ]
    return min(waiting, key=lambda w: w[1]) if waiting else None


def is_due(ctx: Context, sid: str) -> bool:
    try:
        due_at(ctx, sid)
        return True
    except PurgeRefused:
        return False
