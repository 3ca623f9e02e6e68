"""LightningDataModules: plain fine-tuning batches, and paired forget/retain unlearning batches.

An unlearning item is anchored on a forget record and paired with retain records drawn by a
generator seeded with (seed, epoch, index): identical on every rank for the same index, so a
DistributedSampler shards pairs without changing them, and a new draw each epoch.
"""

from __future__ import annotations

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn.data.collate import TrainCollator
from lightning_unlearn.data.formatting import PLAIN, PromptFormat, encode
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError


def encode_records(
    records: list[dict], tokenizer, prompt_format: PromptFormat, max_length: int
) -> list[dict]:
    """Encode each record's question and answer; errors name the record."""
    return [
        encode(r["question"], r["answer"], tokenizer, prompt_format, max_length, where=f"record {r['id']}")
        for r in records
    ]


class PairedDataset(Dataset):
    """Forget item i with ``retain_per_forget`` retain items, chosen reproducibly per epoch."""

    def __init__(
        self, forget: list[dict], retain: list[dict] | None, seed: int, retain_per_forget: int = 1
    ) -> None:
        self.forget, self.retain = forget, retain
        self.seed, self.retain_per_forget = seed, retain_per_forget
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def retain_indices(self, index: int) -> list[int]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index)
        return torch.randint(len(self.retain), (self.retain_per_forget,), generator=gen).tolist()

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict:
        item = {"forget": self.forget[index]}
        if self.retain is not None:
            item["retain"] = [self.retain[j] for j in self.retain_indices(index)]
        return item


class _Flatten(TrainCollator):
    """Collates paired items, flattening the list of retain partners into one sub-batch."""

    def __call__(self, items: list[dict]) -> dict:
        flat = [{k: v for k, v in item.items() if not isinstance(v, list)} for item in items]
        batch = super().__call__(flat)
        for key in items[0]:
            if isinstance(items[0][key], list):
                batch[key] = super().__call__([x for item in items for x in item[key]])
        return batch


class FineTuneDataModule(LightningDataModule):
    """Plain causal-LM batches of one split (the TOFU protocol's target and retain models)."""

    def __init__(
        self,
        tokenizer: str,
        source: str = "locuslab/TOFU",
        split: str = "full",
        prompt_format: PromptFormat = PLAIN,
        max_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer_path, self.source, self.split = tokenizer, source, split
        self.prompt_format = prompt_format
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.items: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.items is None:
            tokenizer = load_tokenizer(self.tokenizer_path)
            self.pad_id = tokenizer.pad_token_id
            records = load_split(self.source, self.split)
            self.items = encode_records(records, tokenizer, self.prompt_format, self.max_length)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.items,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=TrainCollator(self.pad_id),
            num_workers=self.num_workers,
        )


class UnlearningDataModule(LightningDataModule):
    """Batches ``{"forget": ..., "retain": ...}`` with the forget split as the anchor (DESIGN section 3)."""

    def __init__(
        self,
        tokenizer: str,
        source: str = "locuslab/TOFU",
        forget_split: str = "forget01",
        retain_split: str | None = "retain99",
        prompt_format: PromptFormat = PLAIN,
        max_length: int = 256,
        batch_size: int = 4,
        retain_per_forget: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or retain_per_forget < 1:
            raise UserError("batch_size and retain_per_forget must be at least 1")
        self.tokenizer_path, self.source = tokenizer, source
        self.forget_split, self.retain_split = forget_split, retain_split
        self.prompt_format = prompt_format
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.retain_per_forget, self.seed = retain_per_forget, seed
        self.dataset: PairedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_path)
        self.pad_id = tokenizer.pad_token_id
        forget_records = load_split(self.source, self.forget_split)
        forget = encode_records(forget_records, tokenizer, self.prompt_format, self.max_length)
        retain = None
        if self.retain_split:
            forget_ids = {r["question"] for r in forget_records}
            retain_records = [
                r for r in load_split(self.source, self.retain_split) if r["question"] not in forget_ids
            ]
            if not retain_records:
                raise UserError(f"retain split '{self.retain_split}' has no records outside the forget split")
            retain = encode_records(retain_records, tokenizer, self.prompt_format, self.max_length)
        self.dataset = PairedDataset(forget, retain, self.seed, self.retain_per_forget)

    def set_epoch(self, epoch: int) -> None:
        """Redraw retain partners for ``epoch`` (called by the objective at each epoch start)."""
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=_Flatten(self.pad_id),
            num_workers=self.num_workers,
        )
