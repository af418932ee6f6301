"""Copying a shard's objects, batch by batch, with manifest and checkpoint."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from migrator.control.context import Context
from migrator.control.store import SCHEMA
from migrator.errors import ConflictError
from migrator.shard.objects import (
    ensure,
    manifest_digest,
    present_at_destination,
    settings,
    shard_listings,
    source_objects,
    stores,
)
from migrator.stores import s3

log = logging.getLogger("migrator.phases.copy")


@dataclass
class ObjectsCopied:
    copied: int = 0  # objects copied by this call
    skipped: int = 0  # already at the destination with the same content
    # how each endpoint was listed: "common prefix" (once for the shard), "per user"
    # (the common prefix held far more than the shard's objects), or "per batch"
    listed: dict[str, str] = field(default_factory=dict)


def copy_batches(
    ctx: Context,
    sid: str,
    region: str,
    origin: str,
    batches: Mapping[int, list[str]],
    progress: Callable[[int, int], None] | None = None,
) -> ObjectsCopied:
    """Copy the objects of every batch not yet checkpointed; returns totals.

    Batches are pipelined: the next batch is listed and its copies queued while the
    current one's are still running, so the threads do not idle at each batch's end. A
    batch is checkpointed (manifest and checkpoint row) once all its objects are copied;
    a transient error ends the call, and the phase's rerun lists afresh and skips the
    objects already copied."""
    ensure(ctx)
    o = settings(ctx)
    with ctx.control.connect(autocommit=True) as c:
        done = {b for (b,) in c.execute(f"SELECT batch_no FROM {SCHEMA}.object_checkpoint WHERE shard_id = %s", (sid,))}
    src, src_c, dst, dst_c = stores(ctx, region, origin)
    threshold, part = o.multipart_threshold_mb * 2**20, o.part_size_mb * 2**20
    totals = ObjectsCopied()

    pending = [b for b in sorted(batches) if b not in done]
    keys_of = {b: batches[b] for b in pending}  # read once: the listings and the copies both need them
    on_src, on_dst = shard_listings(o, keys_of, (src_c, src.bucket), (dst_c, dst.bucket))
    src_index, dst_index = on_src.index, on_dst.index
    # whether a batch may list the common prefix
    by_prefix = {"source": on_src.common_prefix, "destination": on_dst.common_prefix}
    if o.user_prefix is not None:
        totals.listed = {"source": on_src.how, "destination": on_dst.how}

    def prepare(b: int, pool: ThreadPoolExecutor) -> tuple[dict[str, str | None], dict[str, dict | None]]:
        listed = source_objects(ctx, keys_of[b], origin, src_index, src_c, by_prefix["source"])
        present = present_at_destination(
            ctx, dst_c, dst.bucket, keys_of[b], list(listed), pool, dst_index, by_prefix["destination"]
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
        results = [f.result() for f in futures]
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
        totals.copied += sum(not r.skipped for r in results)
        totals.skipped += sum(r.skipped for r in results)
        settled.append(b)
        left = len(pending) - len(settled)
        eta = (time.monotonic() - started) / len(settled) * left
        log.info(
            "shard %s objects: batch %d/%d checkpointed (batch %d: %d object(s), %d bytes), ETA %.0f s",
            sid,
            len(done) + len(settled),
            len(batches),
            b,
            len(entries),
            sum(n for _, n, _ in entries),
            eta,
        )
        if progress:
            progress(len(done) + len(settled), len(batches))

    settled: list[int] = []
    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=o.threads)
    inflight: collections.deque[tuple[int, list[Future]]] = collections.deque()
    try:
        for b in pending:
            try:
                listed, heads = prepare(b, pool)
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
