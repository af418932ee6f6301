"""Verifying a shard's objects: the bytes on both sides against the manifest."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from migrator.control.context import Context
from migrator.differences import Difference, ObjectDifference
from migrator.shard.objects import (
    manifest,
    manifest_digest,
    settings,
    shard_listings,
    source_objects,
    stores,
)
from migrator.stores import s3


def verify(
    ctx: Context, sid: str, region: str, origin: str, batches: Mapping[int, list[str]]
) -> tuple[dict[tuple[str, int], tuple[int, str]], list[Difference], str | None]:
    """Per batch (objects, manifest digest) as both endpoints now hold the bytes, the
    objects that differ from the manifest, named by key, and how the source was listed for
    the keys each batch should have ("common prefix", "per user", "per batch"; None
    without user prefixes), decided once for the shard as the copy does."""
    o = settings(ctx)
    man = manifest(ctx, sid)
    src, src_c, dst, dst_c = stores(ctx, region, origin)
    part = o.part_size_mb * 2**20
    agg: dict[tuple[str, int], tuple[int, str]] = {}
    diffs: list[Difference] = []
    (on_src,) = shard_listings(o, batches, (src_c, src.bucket))
    with ThreadPoolExecutor(max_workers=o.threads) as pool:
        for b in sorted(batches):
            entries = man.get(b, [])
            expected_keys = list(source_objects(ctx, batches[b], origin, on_src.index, src_c, on_src.common_prefix))
            missing_from_manifest = sorted(set(expected_keys) - {k for k, _, _ in entries})
            diffs += [ObjectDifference(k, "not copied") for k in missing_from_manifest]
            got_src = list(pool.map(lambda e: s3.content_sha256(src_c, src.bucket, e[0], part), entries))
            got_dst = list(pool.map(lambda e: s3.content_sha256(dst_c, dst.bucket, e[0], part), entries))
            for (k, n, h), s_, d_ in zip(entries, got_src, got_dst):
                if d_ is None:
                    diffs.append(ObjectDifference(k, "missing at destination"))
                elif d_ != (n, h):
                    diffs.append(ObjectDifference(k, "different at destination"))
                elif s_ != (n, h):
                    diffs.append(ObjectDifference(k, "changed at source since copy"))
            agg[("objects", b)] = (len(entries), manifest_digest(entries))
    return agg, diffs, on_src.how if o.user_prefix is not None else None
