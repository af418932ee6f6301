"""Which shard a user falls in: a stable hash of the user's key, the same on every rerun."""
from __future__ import annotations

import hashlib


def shard_index(key_text: str, shards: int) -> int:
    """md5 of the key's canonical text, first 60 bits, modulo the shard count."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return int(hashlib.md5(key_text.encode("utf-8")).hexdigest()[:15], 16) % shards


def shard_name(region: str, index: int) -> str:
    return f"{region}-{index:02d}"


def batches(keys: list, size: int) -> list[list]:
    """Consecutive runs of at most `size` keys, in the order given."""
    return [keys[i:i + size] for i in range(0, len(keys), size)]
