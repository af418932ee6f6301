"""Users' objects in S3: copied, verified and rolled back with their rows.

Per batch of users, the object keys come from the spec's key column (read at the source
database) and/or a listing of each user's key prefix at the source endpoint. Objects are
copied by a bounded thread pool (see `stores.s3.copy_object`); the batch's manifest (key,
size, SHA-256) and a checkpoint are written to the control database, so a resumed copy
starts at the next batch and skips objects already copied. Verification re-reads the
bytes on both sides and compares them with the manifest; the manifest digest is part of
the shard digest. Rollback deletes exactly the manifest's keys at the destination.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from psycopg import sql

from migrator import sqlgen
from migrator.context import Context
from migrator.control import SCHEMA
from migrator.errors import ConflictError, is_transient, retrying
from migrator.spec import Objects
from migrator.stores import s3
from migrator.stores.postgres import connect

DDL = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.object_manifest (
  shard_id text NOT NULL REFERENCES {SCHEMA}.shard ON DELETE CASCADE,
  batch_no int NOT NULL,
  key text NOT NULL,
  size bigint NOT NULL,
  sha256 text NOT NULL,
  PRIMARY KEY (shard_id, key)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.object_checkpoint (
  shard_id text NOT NULL REFERENCES {SCHEMA}.shard ON DELETE CASCADE,
  batch_no int NOT NULL,
  objects int NOT NULL,
  bytes bigint NOT NULL,
  digest text NOT NULL,
  at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (shard_id, batch_no)
);
"""


PER_USER_LISTING = 64  # above this many users in a batch, list the common prefix once


def enabled(ctx: Context) -> bool:
    return ctx.spec.objects is not None


def settings(ctx: Context) -> Objects:
    """The spec's objects section; called only where `enabled` holds."""
    if ctx.spec.objects is None:
        raise RuntimeError("the spec has no objects section")  # a caller's mistake
    return ctx.spec.objects


def ensure(ctx: Context) -> None:
    with ctx.control.connect() as c:
        c.execute("SELECT pg_advisory_xact_lock(hashtext('migrator:ddl'))")
        c.execute(DDL)


def manifest_digest(entries: list[tuple[str, int, str]]) -> str:
    text = "\n".join(f"{k}|{n}|{h}" for k, n, h in sorted(entries))
    return hashlib.sha256(text.encode()).hexdigest()


def _owner(key: str, head: str, tail: str) -> str | None:
    """The user whose prefix (head + user + tail) holds the key, if any."""
    if not key.startswith(head):
        return None
    rest = key[len(head) :]
    cut = rest.find(tail) if tail else len(rest)
    return rest[:cut] if cut > 0 else None


Index = dict[str, dict[str, str]]  # user -> key -> ETag, from one listing of the common prefix


def _index(c, bucket: str, prefix_head: str, prefix_tail: str, users: set[str]) -> Index:
    """One listing of the common prefix, kept for the given users only: a shard with many
    batches lists its endpoint once instead of once per batch."""
    out: Index = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix_head):
        for obj in page.get("Contents", []):
            u = _owner(obj["Key"], prefix_head, prefix_tail)
            if u in users:
                out.setdefault(u, {})[obj["Key"]] = obj["ETag"]
    return out


def _listed(
    c, bucket: str, prefix_head: str, prefix_tail: str, users: list[str], index: Index | None = None
) -> dict[str, str]:
    """Key -> ETag of the objects under the users' prefixes at one endpoint."""
    if index is None and len(users) > PER_USER_LISTING:
        # one listing of the common prefix beats a LIST per user for a large batch
        index = _index(c, bucket, prefix_head, prefix_tail, set(users))
    found: dict[str, str] = {}
    if index is not None:
        for u in users:
            found.update(index.get(u, {}))
        return found
    pages = c.get_paginator("list_objects_v2")
    for u in users:
        for page in pages.paginate(Bucket=bucket, Prefix=prefix_head + u + prefix_tail):
            found.update((obj["Key"], obj["ETag"]) for obj in page.get("Contents", []))
    return found


def _source_objects(ctx: Context, users: list[str], index: Index | None = None, src_c=None) -> dict[str, str | None]:
    """The users' object keys at the source, with the ETag the listing gave (None for a
    key known only from the key column)."""
    o = settings(ctx)
    keys: dict[str, str | None] = {}
    if o.key_column is not None:
        table = ctx.tables[o.key_column.table]
        own = sqlgen.ownership(ctx.spec.entity_graph, table.name)
        col = sql.Identifier(o.key_column.column)
        q = sql.SQL("SELECT DISTINCT t0.{} FROM {} WHERE {} AND t0.{} IS NOT NULL").format(
            col, own.from_, sqlgen.keys_filter(own, ctx.key_type), col
        )
        with connect(ctx.source_dsn, autocommit=True, keyed=True) as c:
            keys.update((r[0], None) for r in c.execute(q, sqlgen.keys_arg(users)).fetchall())
    if o.user_prefix is not None:
        src = o.stores[ctx.spec.source_region]
        head, tail = o.user_prefix.split("{user}", 1)
        keys.update(_listed(src_c or s3.client(src), src.bucket, head, tail, users, index))
    return dict(sorted(keys.items()))


def _keys(ctx: Context, users: list[str]) -> list[str]:
    return list(_source_objects(ctx, users))


def _present_at_destination(
    ctx: Context,
    dst_c,
    bucket: str,
    users: list[str],
    keys: list[str],
    pool: ThreadPoolExecutor,
    index: Index | None = None,
) -> set[str]:
    """Which of the keys the destination already holds: one listing of the users' prefixes,
    and a HEAD only for a key outside them."""
    o = settings(ctx)
    present: set[str] = set()
    outside = keys
    if o.user_prefix is not None:
        head, tail = o.user_prefix.split("{user}", 1)
        present = set(_listed(dst_c, bucket, head, tail, users, index)) & set(keys)
        mine = set(users)
        outside = [k for k in keys if _owner(k, head, tail) not in mine]
    found = pool.map(lambda k: s3.head(dst_c, bucket, k) is not None, outside)
    return present | {k for k, there in zip(outside, found) if there}


def _stores(ctx: Context, region: str):
    o = settings(ctx)
    src, dst = o.stores[ctx.spec.source_region], o.stores[region]
    return src, s3.client(src), dst, s3.client(dst)


def copy_batches(
    ctx: Context,
    sid: str,
    region: str,
    batches: Mapping[int, list[str]],
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Copy the objects of every batch not yet checkpointed; returns totals.

    Batches are pipelined: the next batch is listed and its copies queued while the
    current one's are still running, so the threads do not idle at each batch's end. A
    batch is checkpointed (manifest and checkpoint row) once all its objects are copied;
    a transient error reruns that batch, whose objects already copied are then skipped."""
    ensure(ctx)
    o = settings(ctx)
    with ctx.control.connect(autocommit=True) as c:
        done = {b for (b,) in c.execute(f"SELECT batch_no FROM {SCHEMA}.object_checkpoint WHERE shard_id = %s", (sid,))}
    src, src_c, dst, dst_c = _stores(ctx, region)
    threshold, part = o.multipart_threshold_mb * 2**20, o.part_size_mb * 2**20
    totals = {"copied": 0, "skipped": 0}

    pending = [b for b in sorted(batches) if b not in done]
    src_index = dst_index = None
    keys_of = {b: batches[b] for b in pending}  # read once: the listings and the copies both need them
    shard_users = {u for keys in keys_of.values() for u in keys}
    if o.user_prefix is not None and len(shard_users) > PER_USER_LISTING:
        head, tail = o.user_prefix.split("{user}", 1)
        with ThreadPoolExecutor(max_workers=2) as lister:  # both endpoints at once
            fs = lister.submit(_index, src_c, src.bucket, head, tail, shard_users)
            fd = lister.submit(_index, dst_c, dst.bucket, head, tail, shard_users)
            src_index, dst_index = fs.result(), fd.result()

    def prepare(
        b: int, pool: ThreadPoolExecutor, fresh: bool = False
    ) -> tuple[dict[str, str | None], dict[str, dict | None]]:
        # A retry lists afresh: the shard's listings may be what went stale.
        listed = _source_objects(ctx, keys_of[b], None if fresh else src_index, src_c)
        present = _present_at_destination(
            ctx, dst_c, dst.bucket, keys_of[b], list(listed), pool, None if fresh else dst_index
        )
        heads = dict(zip(present, pool.map(lambda k: s3.head(dst_c, dst.bucket, k), present)))
        for k, h in sorted(heads.items()):  # an object we did not write is a conflict, as with rows
            if h is not None and s3.META_SRC_ETAG not in h.get("Metadata", {}):
                raise ConflictError(
                    f"shard {sid} batch {b}: destination object {k!r} exists and was not written by this tool"
                )
        return listed, heads

    def submit(pool: ThreadPoolExecutor, listed: dict, heads: dict) -> list[Future]:
        return [
            pool.submit(
                s3.copy_object,
                src_c,
                src.bucket,
                dst_c,
                dst.bucket,
                k,
                threshold,
                part,
                src_etag=etag,
                dst_head=heads.get(k),
            )
            for k, etag in listed.items()
        ]

    def settle(b: int, futures: list[Future], pool: ThreadPoolExecutor) -> None:
        try:
            results = [f.result() for f in futures]
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            for attempt in retrying(ctx.spec.retry):
                with attempt:
                    results = [f.result() for f in submit(pool, *prepare(b, pool, fresh=True))]
        entries = [(r.key, r.size, r.sha256) for r in results]
        with ctx.control.connect() as c:
            with c.cursor().copy(
                f"COPY {SCHEMA}.object_manifest (shard_id, batch_no, key, size, sha256) FROM STDIN"
            ) as cp:
                for k, n, h in entries:
                    cp.write_row((sid, b, k, n, h))
            c.execute(
                f"INSERT INTO {SCHEMA}.object_checkpoint (shard_id, batch_no, objects, bytes, digest) "
                "VALUES (%s, %s, %s, %s, %s)",
                (sid, b, len(entries), sum(n for _, n, _ in entries), manifest_digest(entries)),
            )
        totals["copied"] += sum(not r.skipped for r in results)
        totals["skipped"] += sum(r.skipped for r in results)

    pool = ThreadPoolExecutor(max_workers=o.threads)
    inflight: collections.deque[tuple[int, list[Future]]] = collections.deque()
    try:
        for b in pending:
            try:
                for attempt in retrying(ctx.spec.retry):
                    with attempt:
                        listed, heads = prepare(b, pool, fresh=attempt.retry_state.attempt_number > 1)
            except BaseException:
                while inflight:  # what is already copying is finished and recorded first
                    settle(*inflight.popleft(), pool)
                raise
            inflight.append((b, submit(pool, listed, heads)))
            while len(inflight) > 1:  # one batch queued behind the one being finished
                settle(*inflight.popleft(), pool)
        while inflight:
            settle(*inflight.popleft(), pool)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return totals


def manifest(ctx: Context, sid: str) -> dict[int, list[tuple[str, int, str]]]:
    if not enabled(ctx):
        return {}
    ensure(ctx)
    with ctx.control.connect(autocommit=True) as c:
        rows = c.execute(
            f"SELECT batch_no, key, size, sha256 FROM {SCHEMA}.object_manifest WHERE shard_id = %s", (sid,)
        ).fetchall()
    out: dict[int, list[tuple[str, int, str]]] = {}
    for b, k, n, h in rows:
        out.setdefault(b, []).append((k, n, h))
    return out


def verify(ctx: Context, sid: str, region: str, batches: Mapping[int, list[str]]) -> tuple[dict, list[dict]]:
    """Per batch (objects, manifest digest) as both endpoints now hold the bytes, and the
    objects that differ from the manifest, named by key."""
    o = settings(ctx)
    man = manifest(ctx, sid)
    src, src_c, dst, dst_c = _stores(ctx, region)
    part = o.part_size_mb * 2**20
    agg: dict[tuple[str, int], tuple[int, str]] = {}
    diffs: list[dict] = []
    with ThreadPoolExecutor(max_workers=o.threads) as pool:
        for b in sorted(batches):
            entries = man.get(b, [])
            expected_keys = _keys(ctx, batches[b])
            missing_from_manifest = sorted(set(expected_keys) - {k for k, _, _ in entries})
            diffs += [{"object": k, "problem": "not copied"} for k in missing_from_manifest]
            got_src = list(pool.map(lambda e: s3.content_sha256(src_c, src.bucket, e[0], part), entries))
            got_dst = list(pool.map(lambda e: s3.content_sha256(dst_c, dst.bucket, e[0], part), entries))
            for (k, n, h), s_, d_ in zip(entries, got_src, got_dst):
                if d_ is None:
                    diffs.append({"object": k, "problem": "missing at destination"})
                elif d_ != (n, h):
                    diffs.append({"object": k, "problem": "different at destination"})
                elif s_ != (n, h):
                    diffs.append({"object": k, "problem": "changed at source since copy"})
            agg[("objects", b)] = (len(entries), manifest_digest(entries))
    return agg, diffs


def rollback(ctx: Context, sid: str, region: str) -> int:
    """Delete the shard's copied objects at the destination; returns how many.

    Those are the manifest's keys and, from a batch that failed before its manifest was
    written, any object under the shard's users' keys that carries this tool's source-ETag
    mark; an object someone else wrote there is left alone."""
    if not enabled(ctx):
        return 0
    man = manifest(ctx, sid)
    _, _, dst, dst_c = _stores(ctx, region)
    keys = {k for entries in man.values() for k, _, _ in entries}
    keys |= _unrecorded(ctx, sid, dst_c, dst.bucket, keys)
    ordered = sorted(keys)
    for i in range(0, len(ordered), 1000):
        chunk = ordered[i : i + 1000]
        for attempt in retrying(ctx.spec.retry):
            with attempt:
                dst_c.delete_objects(Bucket=dst.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
    with ctx.control.connect() as c:
        c.execute(f"DELETE FROM {SCHEMA}.object_manifest WHERE shard_id = %s", (sid,))
        c.execute(f"DELETE FROM {SCHEMA}.object_checkpoint WHERE shard_id = %s", (sid,))
    return len(keys)


def _unrecorded(ctx: Context, sid: str, dst_c, bucket: str, recorded: set[str]) -> set[str]:
    """Objects this tool wrote at the destination for the shard's users but never recorded."""
    o = settings(ctx)
    batches = ctx.control.batch_keys(sid, ctx.sort_keys)
    found: set[str] = set()
    with ThreadPoolExecutor(max_workers=o.threads) as pool:
        for users in batches.values():
            candidates = set(_source_objects(ctx, users))
            if o.user_prefix is not None:  # what the destination lists, and a HEAD only for keys outside
                head, tail = o.user_prefix.split("{user}", 1)
                mine = set(users)
                candidates = set(_listed(dst_c, bucket, head, tail, users)) | {
                    k for k in candidates if _owner(k, head, tail) not in mine
                }
            candidates -= recorded
            heads = pool.map(lambda k: s3.head(dst_c, bucket, k), sorted(candidates))
            found |= {
                k
                for k, h in zip(sorted(candidates), heads)
                if h is not None and s3.META_SRC_ETAG in h.get("Metadata", {})
            }
    return found
