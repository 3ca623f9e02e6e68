"""Work split across ranks for the passes every rank must take part in (cached reference, Grams,
evaluation): contiguous shards padded to equal length, since sharded models need every rank in
each forward."""

from __future__ import annotations

import math

import torch
from torchmetrics.aggregation import CatMetric


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Rank's contiguous share of ``n`` items, padded by repeating an index to ceil(n / world)."""
    per_rank = -(-n // world_size)
    indices = list(range(rank * per_rank, min((rank + 1) * per_rank, n)))
    return indices + [indices[-1] if indices else 0] * (per_rank - len(indices))


def gather_rows(index: list[int], rows: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Every rank's per-item rows (``rows[i]`` belongs to item ``index[i]`` of ``shard_indices``),
    gathered with torchmetrics and put back in item order; a padding row repeats a real one."""
    positions = CatMetric(nan_strategy="disable").to(device)
    values = CatMetric(nan_strategy="disable").to(device)
    positions.update(torch.tensor(index, dtype=torch.float32, device=device))
    values.update(rows.to(device))
    full = torch.full((n, rows.size(1)), math.nan)
    full[positions.compute().long().cpu()] = values.compute().cpu()
    return full
