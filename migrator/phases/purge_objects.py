"""Purging a shard's objects at the source: each key deleted (every version, in a versioned
bucket) only after the destination's bytes are checked against the manifest."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from migrator.control.context import Context
from migrator.differences import ObjectDifference
from migrator.errors import ChecksumMismatch
from migrator.shard.objects import delete_everywhere, manifest, owner, settings, stores
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

    keys = [k for k, _, _ in entries]
    delete_everywhere(src_c, src.bucket, keys, o.threads)
    return keys, sum(1 for t in there if not t)


def without_returned(
    ctx: Context, entries: dict[int, list[tuple[str, int, str]]], back: frozenset[str], later: tuple[str, ...]
) -> dict[int, list[tuple[str, int, str]]]:
    """The shard's manifest but the objects of users a later shard took back to its origin:
    those under their prefixes, and every key a later shard copied there (theirs now)."""
    if not back or not entries:
        return entries
    o = settings(ctx)
    theirs = {k for s in later for batch in manifest(ctx, s).values() for k, _, _ in batch}
    head, tail = o.user_prefix.split("{user}", 1) if o.user_prefix is not None else (None, "")
    return {
        b: [e for e in batch if e[0] not in theirs and (head is None or owner(e[0], head, tail) not in back)]
        for b, batch in entries.items()
    }
