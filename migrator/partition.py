"""Which shard a user falls in: a stable hash of the user's key, the same on every rerun."""

from __future__ import annotations

import hashlib

from psycopg import sql


def shard_index(key_text: str, shards: int) -> int:
    """md5 of the key's canonical text, first 60 bits, modulo the shard count."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return int(hashlib.md5(key_text.encode("utf-8")).hexdigest()[:15], 16) % shards


def shard_index_sql(key_text: sql.Composable, shards: int) -> sql.Composed:
    """`shard_index` computed by PostgreSQL, for a text expression: the same value for the
    same text, so a plan formed in the database agrees with one formed here."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return sql.SQL("mod(('x' || substr(md5({}), 1, 15))::bit(60)::bigint, {})::int").format(
        key_text, sql.Literal(shards)
    )


def shard_name(region: str, index: int) -> str:
    return f"{region}-{index:02d}"
