"""What copy, verify and rollback of objects share: the spec's section, a batch's keys
and their owners, the stores, the manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from migrator.control.context import Context
from migrator.control.store import SCHEMA
from migrator.spec import Objects
from migrator.stores import s3, sqlgen
from migrator.stores.postgres import connect

PER_USER_LISTING = 64  # above this many users in a batch, list the common prefix once


def enabled(ctx: Context) -> bool:
    return ctx.spec.objects is not None


def settings(ctx: Context) -> Objects:
    """The spec's objects section; called only where `enabled` holds."""
    if ctx.spec.objects is None:
        raise RuntimeError("the spec has no objects section")  # a caller's mistake
    return ctx.spec.objects


def ensure(ctx: Context) -> None:
    """The manifest and checkpoint tables are control tables (`migrator.schema`)."""
    ctx.control.ensure()


def manifest_digest(entries: list[tuple[str, int, str]]) -> str:
    text = "\n".join(f"{k}|{n}|{h}" for k, n, h in sorted(entries))
    return hashlib.sha256(text.encode()).hexdigest()


def owner(key: str, head: str, tail: str) -> str | None:
    """The user whose prefix (head + user + tail) holds the key, if any."""
    if not key.startswith(head):
        return None
    rest = key[len(head) :]
    cut = rest.find(tail) if tail else len(rest)
    return rest[:cut] if cut > 0 else None


Index = dict[str, dict[str, str]]  # user -> key -> ETag, from one listing of the common prefix


@dataclass(frozen=True)
class Listing:
    index: Index | None  # the shard's users' keys from one listing of the common prefix
    common_prefix: bool  # whether a batch may list the common prefix (`listed`)
    how: str  # "common prefix", "per user" or "per batch", for the phase's audit row


def page_budget(users: int, threads: int) -> int:
    """How many pages of a common prefix are worth listing for `users` users: as many as
    the rounds their own listings take on `threads` threads (at least 2). Past that the
    prefix holds mostly others' objects (a bucket far larger than the shard), and listing
    each user's prefix is cheaper: bounded by the shard, not by the bucket."""
    return max(2, -(-users // threads))


def prefix_index(
    c, bucket: str, prefix_head: str, prefix_tail: str, users: set[str], max_pages: int | None = None
) -> Index | None:
    """One listing of the common prefix, kept for the given users only: a shard with many
    batches lists its endpoint once instead of once per batch. None once it has read
    `max_pages` pages without reaching the end (see `page_budget`)."""
    out: Index = {}
    for n, page in enumerate(c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix_head), 1):
        for obj in page.get("Contents", []):
            u = owner(obj["Key"], prefix_head, prefix_tail)
            if u in users:
                out.setdefault(u, {})[obj["Key"]] = obj["ETag"]
        if max_pages is not None and n >= max_pages and page.get("IsTruncated"):
            return None
    return out


def shard_listing(c, bucket: str, prefix_head: str, prefix_tail: str, users: set[str], threads: int) -> Listing:
    """How a phase that goes batch by batch lists one endpoint for a shard's `users`,
    decided once for the shard: one listing of the common prefix kept as the shard's index,
    or a listing per user in every batch when that prefix is far larger than the shard
    (`page_budget`). A shard of few users lists per batch."""
    if len(users) <= PER_USER_LISTING:
        return Listing(None, True, "per batch")
    index = prefix_index(c, bucket, prefix_head, prefix_tail, users, page_budget(len(users), threads))
    return Listing(index, index is not None, "common prefix" if index is not None else "per user")


def shard_listings(o: Objects, batches: Mapping[int, list[str]], *endpoints: tuple[Any, str]) -> list[Listing]:
    """`shard_listing` of each endpoint, a (client, bucket), for every user of the shard's
    batches, the endpoints listed at once; without user prefixes, each lists per batch."""
    if o.user_prefix is None:
        return [Listing(None, True, "per batch") for _ in endpoints]
    head, tail = o.user_prefix.split("{user}", 1)
    users = {u for keys in batches.values() for u in keys}
    with ThreadPoolExecutor(max_workers=len(endpoints)) as lister:
        return list(lister.map(lambda e: shard_listing(e[0], e[1], head, tail, users, o.threads), endpoints))


def listed(
    c,
    bucket: str,
    prefix_head: str,
    prefix_tail: str,
    users: list[str],
    index: Index | None = None,
    threads: int = 8,
    common_prefix: bool = True,
) -> dict[str, str]:
    """Key -> ETag of the objects under the users' prefixes at one endpoint: from `index`,
    or one listing of the common prefix for a large batch (unless `common_prefix` is off or
    the prefix is too large for the batch), or a listing per user on `threads` threads."""
    if index is None and common_prefix and len(users) > PER_USER_LISTING:
        index = prefix_index(c, bucket, prefix_head, prefix_tail, set(users), page_budget(len(users), threads))
    found: dict[str, str] = {}
    if index is not None:
        for u in users:
            found.update(index.get(u, {}))
        return found

    def one(u: str) -> list[tuple[str, str]]:
        pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix_head + u + prefix_tail)
        return [(obj["Key"], obj["ETag"]) for page in pages for obj in page.get("Contents", [])]

    if users:
        with ThreadPoolExecutor(max_workers=min(threads, len(users))) as pool:
            for pairs in pool.map(one, users):
                found.update(pairs)
    return found


def source_objects(
    ctx: Context, users: list[str], origin: str, index: Index | None = None, src_c=None, common_prefix: bool = True
) -> dict[str, str | None]:
    """The users' object keys at their origin (the region they move from), with the ETag the listing gave (None for a
    key known only from the key column); `common_prefix` as for `listed`."""
    o = settings(ctx)
    keys: dict[str, str | None] = {}
    if o.key_column is not None:
        table = ctx.tables[o.key_column.table]
        own = sqlgen.ownership(ctx.spec.entity_graph, table.name)
        col = sql.Identifier(o.key_column.column)
        q = sql.SQL("SELECT DISTINCT t0.{} FROM {} WHERE {} AND t0.{} IS NOT NULL").format(
            col, own.from_, sqlgen.keys_filter(own, ctx.key_type), col
        )
        with connect(ctx.dsn(origin), autocommit=True, keyed=True) as c:
            keys.update((r[0], None) for r in c.execute(q, sqlgen.keys_arg(users)).fetchall())
    if o.user_prefix is not None:
        src = o.stores[origin]
        head, tail = o.user_prefix.split("{user}", 1)
        keys.update(listed(src_c or s3.client(src), src.bucket, head, tail, users, index, o.threads, common_prefix))
    return dict(sorted(keys.items()))


def present_at_destination(
    ctx: Context,
    dst_c,
    bucket: str,
    users: list[str],
    keys: list[str],
    pool: ThreadPoolExecutor,
    index: Index | None = None,
    common_prefix: bool = True,
) -> set[str]:
    """Which of the keys the destination already holds: one listing of the users' prefixes
    (`common_prefix` as for `listed`), and a HEAD only for a key outside them."""
    o = settings(ctx)
    present: set[str] = set()
    outside = keys
    if o.user_prefix is not None:
        head, tail = o.user_prefix.split("{user}", 1)
        present = set(listed(dst_c, bucket, head, tail, users, index, o.threads, common_prefix)) & set(keys)
        mine = set(users)
        outside = [k for k in keys if owner(k, head, tail) not in mine]
    found = pool.map(lambda k: s3.head(dst_c, bucket, k) is not None, outside)
    return present | {k for k, there in zip(outside, found) if there}


def stores(ctx: Context, region: str, origin: str):
    """The origin's and the destination's stores, each with a client."""
    o = settings(ctx)
    src, dst = o.stores[origin], o.stores[region]
    return src, s3.client(src), dst, s3.client(dst)


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


def delete_everywhere(c, bucket: str, keys: list[str], threads: int) -> None:
    """Delete the keys from the bucket. A bucket that never had versioning holds one
    version per key; otherwise every version (and delete marker) of the key goes. The
    listings run side by side; the deletes go in DeleteObjects requests, a thousand at a
    time."""
    targets: list[dict[str, str]] = [{"Key": k} for k in keys]
    if keys and c.get_bucket_versioning(Bucket=bucket).get("Status") in ("Enabled", "Suspended"):
        with ThreadPoolExecutor(threads) as pool:
            targets = [t for found in pool.map(lambda k: _versions(c, bucket, k), keys) for t in found]
    s3.delete_keys(c, bucket, targets)


def _versions(c, bucket: str, key: str) -> list[dict[str, str]]:
    """Every version and delete marker of exactly this key (a listing by prefix also
    finds longer keys that start with it)."""
    found = []
    for page in c.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            if v["Key"] == key:
                found.append({"Key": key, "VersionId": v["VersionId"]})
    return found
