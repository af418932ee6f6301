"""A move back: users taken to a region an earlier move of theirs left (ie→us when a user
leaves the EEA, ie→no→ie). The earlier shard left something of theirs there: its copy,
fenced and kept until its purge, or what its purge kept (rows whose columns it
pseudonymised, tables it keeps), and the held fence that refuses their writes there.

The later shard's copy replaces those rows, batch by batch in the batch's own
transaction, and deletes the objects they left there (under their prefixes, and those the
rows being replaced name) before it commits; the objects phase then copies their home's.
Before its first batch, an earlier shard whose copy is still kept is checked
against its freeze (unchanged since its cutover, as a purge checks it) and frozen again
without the returning users, so its purge, its recheck and the audit go on over the users
who stay away. The earlier shard's purge leaves the returning users out; its fence there
lets go of them when the later shard's cutover decides (`capture.arrive`)."""

from __future__ import annotations

import logging

from psycopg import sql

from migrator import capture
from migrator.control.context import Context
from migrator.control.state import MOVED, State
from migrator.control.store import Shard
from migrator.errors import ChecksumMismatch, ShardBusy, StateConflict, TransientError
from migrator.shard import objects
from migrator.shard.digest import CopyDigest, digest_parts, hashed_columns, left_out
from migrator.stores import s3, sqlgen
from migrator.stores.postgres import Conn

log = logging.getLogger("migrator.phases.move_back")


class EarlierShardBusy(TransientError):
    """The earlier shard whose copy a move back replaces is being worked on (its purge)."""


def make_room(ctx: Context, shard: Shard) -> set[str]:
    """Before the shard's copy: the users it takes back to a region an earlier move of theirs
    left (their rows there are replaced batch by batch), each earlier shard's kept copy
    frozen again without them."""
    ctl = ctx.control
    returning: set[str] = set()
    for earlier_sid, keys in sorted(ctl.left_before(shard.shard_id, ctx.spec.source_region).items()):
        earlier = ctl.shard(earlier_sid)
        if earlier.state not in MOVED:
            continue  # rolled back or never cut over: its rows there went with the rollback
        if earlier.state == State.CUT_OVER:
            try:
                with ctl.lock(earlier_sid):
                    refreeze(ctx, ctl.shard(earlier_sid), shard.shard_id)
            except ShardBusy:
                raise EarlierShardBusy(
                    f"shard {shard.shard_id}: shard {earlier_sid}, whose kept copy at {shard.region} it replaces for "
                    f"{len(keys)} user(s), is being worked on; retried later"
                ) from None
        elif earlier.state == State.PURGING:
            raise EarlierShardBusy(
                f"shard {shard.shard_id}: shard {earlier_sid}, whose copy at {shard.region} it replaces for "
                f"{len(keys)} user(s), is being purged; retried once its purge has finished"
            )
        returning.update(keys)
    return returning


def refreeze(ctx: Context, earlier: Shard, later: str) -> None:
    """The earlier shard's kept copy, read now in one pass: as a whole against its freeze
    (ChecksumMismatch if it changed past the fence), then kept as its freeze without the
    users `later` takes back. Done once per later shard; the caller holds the earlier
    shard's lock."""
    sid = earlier.shard_id
    then = CopyDigest.from_record(earlier.frozen) if earlier.frozen is not None else None
    if then is not None and later in then.without:
        return
    hashed = hashed_columns(ctx, then)
    without = then.without if then is not None else ()
    leaving = ctx.control.taken_back(sid, ctx.origin(earlier)).get(later, [])
    parts = digest_parts(ctx, sid, ctx.origin_dsn(earlier), hashed, left_out(ctx, sid, without), leaving)
    whole: dict[tuple[str, int], tuple[int, str]] = {}
    for (t, b), (n, s) in parts.items():
        key = (t, b if b >= 0 else -1 - b)
        n0, s0 = whole.get(key, (0, "0"))
        whole[key] = (n0 + n, str(int(s0) + int(s)))
    columns = {t: tuple(table.names) for t, table in hashed.items()}
    if then is not None:
        changed = then.differing(CopyDigest.of(whole, columns, without))
        if changed:
            raise ChecksumMismatch(
                f"shard {sid}: its copy at {ctx.origin(earlier)} changed since the cutover froze it (tables "
                f"{', '.join(changed)}), past the fence: shard {later} does not replace it"
            )
    elif ctx.spec.changes.capture and capture.fences(ctx.origin_dsn(earlier), sid).get(sid) != capture.HELD:
        raise StateConflict(
            f"shard {sid}: no digest of its copy at {ctx.origin(earlier)} was kept at cutover and its fence there is "
            f"not held, so the copy cannot be shown unchanged: shard {later} does not replace it"
        )
    staying = {k: v for k, v in parts.items() if k[1] >= 0}
    now = CopyDigest.of(staying, columns, (*without, later))
    ctx.control.keep(
        sid,
        {"event": "source copy frozen again", "digest": now.digest, "users_moving_back": len(leaving), "by": later},
        frozen=now.record(),
    )
    log.info("shard %s: copy frozen again without %d user(s) shard %s takes back", sid, len(leaving), later)


def clear_objects(ctx: Context, dst: Conn, region: str, back: list[str]) -> int:
    """Delete, every version, the objects users moving back left in `region`'s bucket: those
    under their prefixes and those their rows there (read on `dst`, before they are
    replaced) name. Their home's objects are copied in their place by the objects phase.
    Run again after a kill, it finds what is still there; how many keys."""
    if not objects.enabled(ctx):
        return 0
    o = objects.settings(ctx)
    store = o.stores[region]
    c = s3.client(store)
    keys: set[str] = set()
    if o.key_column is not None:
        own = sqlgen.ownership(ctx.spec.entity_graph, o.key_column.table)
        col = sql.Identifier(o.key_column.column)
        q = sql.SQL("SELECT DISTINCT t0.{} FROM {} WHERE {} AND t0.{} IS NOT NULL").format(
            col, own.from_, sqlgen.keys_filter(own, ctx.key_type), col
        )
        keys.update(r[0] for r in dst.execute(q, sqlgen.keys_arg(back)).fetchall())
    if o.user_prefix is not None:
        head, tail = o.user_prefix.split("{user}", 1)
        keys.update(objects.listed(c, store.bucket, head, tail, back, None, o.threads, common_prefix=False))
    objects.delete_everywhere(c, store.bucket, sorted(keys), o.threads)
    return len(keys)
