"""Data for the influence step: the records the adapter was fine-tuned on, and
the edit to make to them (records removed, or records whose question or answer is replaced).

The influence step is one linear solve, not a loop over batches, so the train loader yields a
single item per rank: that rank's share of the training batches and of the edited rows. Shards
are disjoint and unpadded (the solver sums over them, so a repeated row would count twice), and
every rank gets the same number of training batches (the stochastic solver draws the same batch
index on every rank).
"""

from __future__ import annotations

from pathlib import Path

from lightning import LightningDataModule
from torch.utils.data import DataLoader

from lightning_unlearn.data.collate import pad_batch
from lightning_unlearn.data.datamodule import check_at_least, encode_records
from lightning_unlearn.data.formatting import PLAIN, PromptFormat
from lightning_unlearn.data.records import load_records, parse_rows, validate_record
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError

REMOVAL = "instance_removal"
# The field of an edits file that holds the new value, per edit kind.
NEW_FIELDS = {"query_modification": "new_question", "response_correction": "new_answer"}
EDIT_KINDS = (REMOVAL, *NEW_FIELDS)


def contiguous_parts(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous pieces whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def _first(items: list[dict]) -> dict:
    # The loader's one item is already a batch (picklable for ddp_spawn workers, unlike a lambda).
    return items[0]


def _key(record: dict) -> tuple[str, str]:
    return record["question"], record["answer"]


class InfluenceDataModule(LightningDataModule):
    """The training set of a fine-tuned adapter and one edit of it, for ``InfluenceStep``.

    Args:
        tokenizer: tokenizer path or hub id (the fine-tuned model's).
        source: TOFU hub id, a local directory of split files, or one JSON/JSONL file.
        train_split: what the adapter was fine-tuned on (e.g. ``full``); n_train is its size.
        edit: ``instance_removal``, ``query_modification`` or ``response_correction``; None infers
            it: removal when ``removed_split``/``removed_file`` is given, else from the first row
            of ``edits_file`` (``new_question`` or ``new_answer``).
        removed_split: instance removal: a split of ``source`` (e.g. ``forget10``) to remove.
        removed_file: instance removal: a JSON/JSONL records file to remove instead.
        edits_file: query modification / response correction: JSON/JSONL rows with ``question``,
            ``answer`` (the training record as it is) and ``new_question`` or ``new_answer``.
        prompt_format, max_length: as for fine-tuning; must match it, or the loss is another one.
        batch_size: rows per forward pass in each Hessian-vector product (memory, not maths).
    """

    def __init__(
        self,
        tokenizer: str,
        source: str = "locuslab/TOFU",
        train_split: str = "full",
        edit: str | None = None,
        removed_split: str | None = None,
        removed_file: str | None = None,
        edits_file: str | None = None,
        prompt_format: PromptFormat = PLAIN,
        max_length: int = 256,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        inputs = {"removed_split": removed_split, "removed_file": removed_file, "edits_file": edits_file}
        given = [name for name, value in inputs.items() if value]
        if len(given) != 1:
            raise UserError(
                "influence data: give exactly one of removed_split or removed_file (instance removal) "
                f"or edits_file (query modification / response correction); got {', '.join(given) or 'none'}"
            )
        if edit is not None and edit not in EDIT_KINDS:
            raise UserError(f"influence data: edit must be one of {', '.join(EDIT_KINDS)}, got {edit!r}")
        if edits_file is None and edit not in (None, REMOVAL):
            raise UserError(
                f"influence data: edit '{edit}' reads its rows from edits_file, not from {given[0]}"
            )
        if edits_file is not None and edit == REMOVAL:
            raise UserError(
                "influence data: instance_removal takes removed_split or removed_file, not edits_file"
            )
        check_at_least(1, max_length=max_length, batch_size=batch_size)
        self.tokenizer_path, self.source, self.train_split = tokenizer, source, train_split
        self.edit = REMOVAL if edits_file is None else edit
        self.removed_split, self.removed_file, self.edits_file = removed_split, removed_file, edits_file
        self.prompt_format, self.max_length, self.batch_size = prompt_format, max_length, batch_size
        self.train: list[dict] | None = None

    # -- loading and checking ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_path)
        self.pad_id = tokenizer.pad_token_id
        train_records = load_split(self.source, self.train_split)
        trained = {_key(r) for r in train_records}
        if self.edits_file is None:
            old_records, new_records = self._removed(trained), None
        else:
            old_records, new_records = self._edits(trained)
        self.n_train, self.edited_ids = len(train_records), [str(r["id"]) for r in old_records]

        def encode(records: list[dict]) -> list[dict]:
            return encode_records(records, tokenizer, self.prompt_format, self.max_length)

        self.train = encode(train_records)
        self.old = encode(old_records)
        self.new = encode(new_records) if new_records is not None else None

    def _where_trained(self) -> str:
        return (
            f"the training data (split '{self.train_split}' of {self.source}, matched on question and answer)"
        )

    def _removed(self, trained: set[tuple[str, str]]) -> list[dict]:
        if self.removed_file is not None:
            records, origin = load_records(self.removed_file), self.removed_file
        else:
            records = load_split(self.source, self.removed_split)
            origin = f"split '{self.removed_split}' of {self.source}"
        seen: set[tuple[str, str]] = set()
        for record in records:
            if _key(record) not in trained:
                raise UserError(
                    f"{origin}: record {record['id']} is not in {self._where_trained()}: "
                    f"question {record['question'][:80]!r}"
                )
            if _key(record) in seen:
                raise UserError(
                    f"{origin}: record {record['id']} is listed twice (it would be removed twice)"
                )
            seen.add(_key(record))
        if len(records) == len(trained):
            raise UserError(
                f"{origin}: removes all {len(records)} records of {self._where_trained()}: "
                "nothing would be left to fit"
            )
        return records

    def _edits(self, trained: set[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
        path = Path(self.edits_file)
        if not path.is_file():
            raise UserError(f"edits file '{path}' does not exist")
        rows = parse_rows(path)
        if not rows:
            raise UserError(f"{path}: no edits")
        if self.edit is None:
            self.edit = self._infer_kind(path, *rows[0])
        field = NEW_FIELDS[self.edit]
        target = field.removeprefix("new_")
        old_records, new_records, seen = [], [], {}
        for row, item in rows:
            where = f"{path}: row {row}"
            record = dict(validate_record(item, where, require=(field,)))
            value = record[field]
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: field '{field}' must be a non-empty string ({self.edit})")
            if value == record[target]:
                raise UserError(f"{where}: '{field}' equals '{target}': the row changes nothing")
            if _key(record) not in trained:
                raise UserError(
                    f"{where}: the record to edit is not in {self._where_trained()}: "
                    f"question {record['question'][:80]!r}"
                )
            if _key(record) in seen:
                raise UserError(f"{where}: edits the same training record as row {seen[_key(record)]}")
            seen[_key(record)] = row
            record.setdefault("id", f"{path.name}:{row}")
            old_records.append(record)
            new_records.append({**record, target: value})
        return old_records, new_records

    @staticmethod
    def _infer_kind(path: Path, row: int, item: object) -> str:
        fields = [f for f in NEW_FIELDS.values() if isinstance(item, dict) and f in item]
        if len(fields) != 1:
            raise UserError(
                f"{path}: row {row}: cannot tell the edit kind (a row needs exactly one of "
                f"{', '.join(NEW_FIELDS.values())}); set data edit: query_modification or response_correction"
            )
        return next(kind for kind, f in NEW_FIELDS.items() if f == fields[0])

    # -- what each rank gets ------------------------------------------------------------------
    def shard(self, rank: int = 0, world_size: int = 1) -> dict:
        """Rank's share of the problem: ``train`` (its batches of the training set), ``edit``
        (``removed``, or paired ``old``/``new`` batches of its edited rows; possibly none), the
        edit ``kind``, the global ``n_train`` and the ids of every edited record."""
        if self.train is None:
            self.setup("fit")
        n = len(self.train)
        if n < world_size:
            raise UserError(f"{n} training records cannot be shared among {world_size} processes")
        rows = contiguous_parts(n, world_size)[rank]
        # Equal batch counts on every rank; capped so that no batch is empty on the smallest shard.
        count = max(1, min(-(-n // (world_size * self.batch_size)), n // world_size))
        parts = [rows[p.start : p.stop] for p in contiguous_parts(len(rows), count)]
        train = [self._collate(self.train, part) for part in parts]
        mine = contiguous_parts(len(self.old), world_size)[rank]
        chunks = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        if self.new is None:
            edit = {"removed": [self._collate(self.old, c) for c in chunks]}
        else:
            edit = {"old": [self._collate(self.old, c) for c in chunks],
                    "new": [self._collate(self.new, c) for c in chunks]}  # fmt: skip
        return {"kind": self.edit, "n_train": n, "edited_ids": self.edited_ids, "train": train, "edit": edit}

    def _collate(self, features: list[dict], rows: range) -> dict:
        return pad_batch([features[i] for i in rows], self.pad_id)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # One item; a DistributedSampler over it hands every rank index 0, i.e. its own shard.
        return DataLoader([self.shard(rank, world)], batch_size=1, collate_fn=_first)
