"""LightningDataModules: plain fine-tuning batches, and paired forget/retain unlearning batches.

An unlearning item is anchored on a forget record and paired with retain records drawn by a
generator seeded with (seed, epoch, index): identical on every rank for the same index, so a
DistributedSampler shards pairs without changing them, and a new draw each epoch. Every
sub-batch carries each row's ``index`` into its split, which the ``cached`` reference looks up.
"""

from __future__ import annotations

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn.data.collate import TrainCollator
from lightning_unlearn.data.formatting import PLAIN, PromptFormat, encode
from lightning_unlearn.data.records import check_disjoint
from lightning_unlearn.data.refusals import load_refusals, refusal_records
from lightning_unlearn.data.resumable import ResumableLoader, ResumableSampler
from lightning_unlearn.data.tofu import load_split, split_where
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.distributed import shard_indices
from lightning_unlearn.errors import ConfigError, UserError
from lightning_unlearn.seeds import stream_seed


def check_at_least(minimum: int, section: str = "data", **values: int | None) -> None:
    """Refuse a setting below ``minimum`` (None: unset, allowed), naming its config key
    (``<section>.<key>``)."""
    for key, value in values.items():
        if value is not None and value < minimum:
            raise ConfigError(f"{section}.{key} must be at least {minimum}, got {value}")


def encode_records(
    records: list[dict], tokenizer, prompt_format: PromptFormat, max_length: int, origin: str | None = None
) -> list[dict]:
    """Encode each record's question and answer; errors name the record (and ``origin``, its file,
    which a generated ``<file>:<row>`` id already holds but a record's own id does not)."""
    prefix = f"{origin}: " if origin else ""
    return [
        encode(
            r["question"],
            r["answer"],
            tokenizer,
            prompt_format,
            max_length,
            where=f"{prefix}record {r['id']}",
        )
        for r in records
    ]


class PairedDataset(Dataset):
    """Forget item i with ``retain_per_forget`` retain items, chosen reproducibly per epoch, and
    optionally the refusal counterparts of both (``forget_idk``, ``retain_idk``)."""

    def __init__(
        self,
        forget: list[dict],
        retain: list[dict] | None,
        seed: int,
        retain_per_forget: int = 1,
        forget_idk: list[dict] | None = None,
        retain_idk: list[dict] | None = None,
    ) -> None:
        if retain_idk is not None and (retain is None or len(retain_idk) != len(retain)):
            raise ValueError("retain_idk must pair one-to-one with retain")
        self.forget, self.retain, self.forget_idk, self.retain_idk = forget, retain, forget_idk, retain_idk
        self.seed, self.retain_per_forget = seed, retain_per_forget
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def retain_indices(self, index: int) -> list[int]:
        gen = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch) * 1_000_033 + index)
        return torch.randint(len(self.retain), (self.retain_per_forget,), generator=gen).tolist()

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict:
        item = {"forget": {**self.forget[index], "index": index}}
        if self.forget_idk is not None:
            item["forget_idk"] = {**self.forget_idk[index], "index": index}
        if self.retain is not None:
            partners = self.retain_indices(index)
            item["retain"] = [{**self.retain[j], "index": j} for j in partners]
            if self.retain_idk is not None:
                item["retain_idk"] = [{**self.retain_idk[j], "index": j} for j in partners]
        return item

    def shard(self, name: str, rank: int, world_size: int) -> list[dict]:
        """Rank's contiguous share of split ``name`` (``forget`` or ``forget_idk``) with indices,
        padded by repeating an item so every rank runs the same number of forward passes."""
        items = getattr(self, name)
        return [{**items[i], "index": i} for i in shard_indices(len(items), rank, world_size)]


class EpochShuffle(ResumableSampler):
    """A permutation drawn from (seed, the dataset's current epoch) when iteration starts, never
    from the global RNG: the order of an epoch does not depend on what else drew random numbers
    before it (a sanity check, an adapter re-initialisation), so a resumed sequential run sees the
    same batches as an uninterrupted one. With ``num_replicas`` ranks, rank r takes positions
    r, r + num_replicas, ... of that one permutation (padded by wrapping round), so every world
    size sees the same global batches. It is a DistributedSampler so that Lightning does not wrap
    it in its own, which would reshuffle with a different seed; a ``ResumableSampler``, so a
    preempted run restarts mid-epoch."""

    def __init__(self, dataset: PairedDataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def order(self) -> list[int]:
        gen = torch.Generator().manual_seed(stream_seed(self.dataset.seed, self.dataset.epoch) * 7919 + 1)
        order = torch.randperm(len(self.dataset), generator=gen).tolist()
        order += order[: self.total_size - len(order)]
        return order[self.rank : self.total_size : self.num_replicas]


class _Flatten(TrainCollator):
    """Collates paired items, flattening the list of retain partners into one sub-batch."""

    def __call__(self, items: list[dict]) -> dict:
        flat = [{k: v for k, v in item.items() if not isinstance(v, list)} for item in items]
        batch = super().__call__(flat)
        for key in items[0]:
            if isinstance(items[0][key], list):
                batch[key] = super().__call__([x for item in items for x in item[key]])
        return batch


class _LoaderMixin:
    """Train loaders shuffle; validation and test loaders see the same data in order."""

    def _replicas(self) -> dict[str, int]:
        """The data-parallel world this loader is dealt to: the strategy's (1 outside a Trainer)."""
        kwargs = getattr(getattr(self.trainer, "strategy", None), "distributed_sampler_kwargs", None) or {}
        return {"num_replicas": kwargs.get("num_replicas", 1), "rank": kwargs.get("rank", 0)}

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        # The order is a function of (seed, epoch) only, never of the global RNG, and one
        # permutation is dealt to the ranks: 2 processes see the batches 1 process does, and a
        # run resumed at an epoch boundary or mid-epoch sees the batches an uninterrupted one would.
        sampler = ResumableSampler(self.dataset, shuffle=True, seed=self.seed, **self._replicas())
        return ResumableLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset, shuffle=False)


class FineTuneDataModule(_LoaderMixin, LightningDataModule):
    """Plain causal-LM batches of one split (the TOFU protocol's target and retain models),
    shuffled by ``seed`` and the epoch."""

    def __init__(
        self,
        tokenizer: str,
        source: str = "locuslab/TOFU",
        split: str = "full",
        prompt_format: PromptFormat = PLAIN,
        max_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_at_least(1, max_length=max_length, batch_size=batch_size)
        check_at_least(0, num_workers=num_workers)
        self.tokenizer_path, self.source, self.split = tokenizer, source, split
        self.prompt_format, self.max_length = prompt_format, max_length
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.dataset: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            tokenizer = load_tokenizer(self.tokenizer_path)
            self.collator = TrainCollator(tokenizer.pad_token_id)
            records = load_split(self.source, self.split)
            self.dataset = encode_records(
                records, tokenizer, self.prompt_format, self.max_length, split_where(self.source, self.split)
            )


class UnlearningDataModule(_LoaderMixin, LightningDataModule):
    """Batches ``{"forget", "retain"[, "forget_idk", "retain_idk"]}`` with the forget split as the
    anchor.

    Args:
        refusals: add ``forget_idk`` and ``retain_idk`` sub-batches (the same questions with a
            refusal answer) for the IDK objectives: ``builtin`` (our own list) or a text file
            with one refusal per line.
    """

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
        refusals: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_at_least(1, max_length=max_length, batch_size=batch_size, retain_per_forget=retain_per_forget)
        check_at_least(0, num_workers=num_workers)
        if retain_split is not None and retain_split == forget_split:
            raise ConfigError(
                f"data.retain_split is the forget split '{forget_split}': the retain set must not hold "
                "what is being forgotten"
            )
        self.tokenizer_path, self.source = tokenizer, source
        self.forget_split, self.retain_split = forget_split, retain_split
        self.prompt_format, self.max_length = prompt_format, max_length
        self.batch_size, self.num_workers = batch_size, num_workers
        self.retain_per_forget, self.refusals, self.seed = retain_per_forget, refusals, seed
        self.dataset: PairedDataset | None = None
        self.epoch_offset = 0  # sequential forgetting: pairing epochs count from the request's start

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(self.dataset, **self._replicas()),
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        tokenizer = self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.collator = _Flatten(tokenizer.pad_token_id)
        forget_records = self.forget_records = load_split(self.source, self.forget_split)
        forget_where = split_where(self.source, self.forget_split)
        forget = encode_records(forget_records, tokenizer, self.prompt_format, self.max_length, forget_where)
        retain = None
        if self.retain_split:
            retain_records = load_split(self.source, self.retain_split)
            retain_where = split_where(self.source, self.retain_split)
            check_disjoint(forget_records, retain_records, forget_where, retain_where)
            # the same question with another answer is not the same record, but training on it
            # would still teach the answer being unlearned: leave it out of retain
            forget_questions = {r["question"] for r in forget_records}
            retain_records = [r for r in retain_records if r["question"] not in forget_questions]
            if not retain_records:
                raise UserError(f"retain split '{self.retain_split}' has no records outside the forget split")
            retain = encode_records(
                retain_records, tokenizer, self.prompt_format, self.max_length, retain_where
            )
        forget_idk = retain_idk = None
        if self.refusals:
            refusals = load_refusals(self.refusals)
            idk = refusal_records(forget_records, refusals, self.seed)
            forget_idk = encode_records(idk, tokenizer, self.prompt_format, self.max_length)
            if retain is not None:
                idk = refusal_records(retain_records, refusals, self.seed + 1)
                retain_idk = encode_records(idk, tokenizer, self.prompt_format, self.max_length)
        self.dataset = PairedDataset(
            forget, retain, self.seed, self.retain_per_forget, forget_idk, retain_idk
        )

    def reference_loader(self, name: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Rank's shard of the items of sub-batch ``name``, in order, for precomputing reference values."""
        if self.dataset is None:
            self.setup("fit")
        if getattr(self.dataset, name, None) is None:
            raise UserError(f"the data has no '{name}' items (set refusals for the *_idk sub-batches)")
        return DataLoader(
            self.dataset.shard(name, rank, world_size),
            batch_size=self.batch_size,
            collate_fn=TrainCollator(self.collator.pad_id),
            num_workers=self.num_workers,
        )

    def set_epoch(self, epoch: int) -> None:
        """Redraw retain partners for ``epoch`` (called by the objective at each epoch start)."""
        if self.dataset is not None:
            self.dataset.set_epoch(epoch - self.epoch_offset)

    def records_by_id(self, ids: list) -> list[dict]:
        """The forget split's records with these ids, in this order."""
        if self.dataset is None:
            self.setup("fit")
        by_id = {str(r["id"]): r for r in self.forget_records}
        missing = [i for i in ids if str(i) not in by_id]
        if missing:
            raise UserError(
                f"forget split '{self.forget_split}' has no record with id {', '.join(map(str, missing[:5]))}"
            )
        return [by_id[str(i)] for i in ids]

    def set_forget(self, records: list[dict]) -> None:
        """Unlearn these records from now on (one sequential-forgetting request); retain is unchanged."""
        if self.dataset is None:
            self.setup("fit")
        forget = encode_records(records, self.tokenizer, self.prompt_format, self.max_length)
        forget_idk = None
        if self.refusals:
            idk = refusal_records(records, load_refusals(self.refusals), self.seed)
            forget_idk = encode_records(idk, self.tokenizer, self.prompt_format, self.max_length)
        old = self.dataset
        self.dataset = PairedDataset(
            forget, old.retain, self.seed, self.retain_per_forget, forget_idk, old.retain_idk
        )
