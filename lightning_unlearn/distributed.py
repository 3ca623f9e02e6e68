"""Work split across ranks for the passes every rank must take part in (cached reference, Grams,
evaluation): contiguous shards padded to equal length, since sharded models need every rank in
each forward."""

from __future__ import annotations


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Rank's contiguous share of ``n`` items, padded by repeating an index to ceil(n / world)."""
    per_rank = -(-n // world_size)
    indices = list(range(rank * per_rank, min((rank + 1) * per_rank, n)))
    return indices + [indices[-1] if indices else 0] * (per_rank - len(indices))
