"""Rolling back a shard's objects: exactly the manifest's keys (and strays) at the destination."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from migrator.control.context import Context
from migrator.control.store import SCHEMA
from migrator.shard.objects import (
    enabled,
    listed,
    manifest,
    owner,
    settings,
    shard_listings,
    source_objects,
    stores,
)
from migrator.stores import s3


def rollback(ctx: Context, sid: str, region: str, origin: str) -> int:
    """Delete the shard's copied objects at the destination; returns how many.

    Those are the manifest's keys and, from a batch that failed before its manifest was
    written, any object under the shard's users' keys that carries this tool's source-ETag
    mark; an object someone else wrote there is left alone."""
    if not enabled(ctx):
        return 0
    man = manifest(ctx, sid)
    _, _, dst, dst_c = stores(ctx, region, origin)
    keys = {k for entries in man.values() for k, _, _ in entries}
    keys |= _unrecorded(ctx, sid, origin, dst_c, dst.bucket, keys)
    s3.delete_keys(dst_c, dst.bucket, [{"Key": k} for k in sorted(keys)])
    with ctx.control.connect() as c:
        c.execute(f"DELETE FROM {SCHEMA}.object_manifest WHERE shard_id = %s", (sid,))
        c.execute(f"DELETE FROM {SCHEMA}.object_checkpoint WHERE shard_id = %s", (sid,))
    return len(keys)


def _unrecorded(ctx: Context, sid: str, origin: str, dst_c, bucket: str, recorded: set[str]) -> set[str]:
    """Objects this tool wrote at the destination for the shard's users but never recorded."""
    o = settings(ctx)
    batches = ctx.control.batch_keys(sid, ctx.sort_keys)
    found: set[str] = set()
    src = o.stores[origin]
    src_c = s3.client(src)
    # decided once for the shard, as the copy does
    on_src, on_dst = shard_listings(o, batches, (src_c, src.bucket), (dst_c, bucket))
    if o.user_prefix is not None:
        head, tail = o.user_prefix.split("{user}", 1)
    with ThreadPoolExecutor(max_workers=o.threads) as pool:
        for users in batches.values():
            candidates = set(source_objects(ctx, users, origin, on_src.index, src_c, on_src.common_prefix))
            if o.user_prefix is not None:  # what the destination lists, and a HEAD only for keys outside
                mine = set(users)
                dst_keys = listed(dst_c, bucket, head, tail, users, on_dst.index, o.threads, on_dst.common_prefix)
                candidates = set(dst_keys) | {k for k in candidates if owner(k, head, tail) not in mine}
            candidates -= recorded
            heads = pool.map(lambda k: s3.head(dst_c, bucket, k), sorted(candidates))
            found |= {
                k
                for k, h in zip(sorted(candidates), heads)
                if h is not None and s3.META_SRC_ETAG in h.get("Metadata", {})
            }
    return found
