"""Collators: right padding for training and scoring, left padding for generation.

The attention mask comes from each sequence's real length, never from ``ids != pad_id``: pad
is often the same token as EOS, which is scored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unlearn.losses import IGNORE_INDEX


def pad_batch(features: list[dict], pad_id: int, side: str = "right") -> dict[str, Tensor]:
    """Stack ``input_ids`` (and ``labels`` if present) with padding on ``side``; an ``index``
    per row (its position in its split) passes through as a tensor."""
    width = max(len(f["input_ids"]) for f in features)
    has_labels = "labels" in features[0]
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(feature["input_ids"])
        mask[row, cols] = 1
        if has_labels:
            labels[row, cols] = torch.tensor(feature["labels"])
    batch = {"input_ids": ids, "attention_mask": mask}
    if has_labels:
        batch["labels"] = labels
    if "index" in features[0]:
        batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
    return batch


class TrainCollator:
    """Collates items that are either one encoded sequence or a dict of named sub-sequences.

    A picklable class (not a closure) so DataLoader workers and ``ddp_spawn`` can ship it.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        if "input_ids" in items[0]:
            return pad_batch(items, self.pad_id)
        return {key: pad_batch([item[key] for item in items], self.pad_id) for key in items[0]}
