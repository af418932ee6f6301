"""Purging a shard's objects at the source: each key deleted (every version, in a versioned
bucket) only after the destination's bytes are checked against the manifest."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from migrator.control.context import Context
from migrator.differences import ObjectDifference
from migrator.errors import ChecksumMismatch
from migrator.shard.objects import settings, stores
from migrator.stores import s3


def keys_digest(keys: list[str]) -> str:
    """The SHA-256 of a sorted key list, one key per line: a receipt that names no key."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def purge_batch(
    ctx: Context, sid: str, region: str, origin: str, entries: list[tuple[str, int, str]]
) -> tuple[list[str], int]:
    """Check each manifest entry (key, size, SHA-256) at the source, then delete the key's
    every version there; returns the keys deleted and how many of them the destination no
    longer holds. Deleting a key that is already gone is a no-op, so a rerun after a kill
    finishes the batch.

    As for rows, the destination is the application's from the flip on: an object it
    overwrote or deleted at the user's new home is no reason to keep the old copy, so the
    destination's bytes are not compared. What is proved is that each source object about
    to go is exactly the one that was copied and verified (one changed since, by a writer
    still using the old home, refuses the batch: its newer bytes exist nowhere else). The
    keys the destination no longer holds are counted in the receipt."""
    if not entries:
        return [], 0
    o = settings(ctx)
    src, src_c, dst, dst_c = stores(ctx, region, origin)
    part = o.part_size_mb * 2**20
    with ThreadPoolExecutor(o.threads) as pool:
        got = list(pool.map(lambda e: s3.content_sha256(src_c, src.bucket, e[0], part), entries))
        there = list(pool.map(lambda e: s3.head(dst_c, dst.bucket, e[0]) is not None, entries))
    bad = [
        ObjectDifference(k, "changed at the source since its copy")
        for (k, n, h), g in zip(entries, got)
        if g is not None and g != (n, h)
    ]
    if bad:
        raise ChecksumMismatch(
            f"shard {sid}: {len(bad)} object(s) at the source changed since they were copied to {region} "
            f"(first: {bad[0].named()}); nothing of them was purged",
            bad,
        )

    # A bucket that never had versioning holds one version per key; otherwise every version
    # (and delete marker) of the key goes. The listings run side by side; the deletes go
    # in DeleteObjects requests, a thousand at a time.
    versioned = src_c.get_bucket_versioning(Bucket=src.bucket).get("Status") in ("Enabled", "Suspended")
    keys = [k for k, _, _ in entries]
    targets: list[dict[str, str]] = [{"Key": k} for k in keys]
    if versioned:
        with ThreadPoolExecutor(o.threads) as pool:
            targets = [t for found in pool.map(lambda k: _versions(ctx, src_c, src.bucket, k), keys) for t in found]
    s3.delete_keys(src_c, src.bucket, targets)
    return keys, sum(1 for t in there if not t)


def _versions(ctx: Context, c, bucket: str, key: str) -> list[dict[str, str]]:
    """Every version and delete marker of exactly this key (a listing by prefix also
    finds longer keys that start with it)."""
    found = []
    for page in c.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            if v["Key"] == key:
                found.append({"Key": key, "VersionId": v["VersionId"]})
    return found
