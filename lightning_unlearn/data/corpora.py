"""Plain-text corpora as training batches: WMDP's forget corpora and RMU's retain corpus, MUSE's
raw documents.

RMU (Li et al., 2024, "The WMDP Benchmark") unlearns from documents, not question/answer records:
every token of a forget text is steered and every token of a retain text held in place. Here a
text is its tokens (the tokenizer's default special tokens, truncated to ``max_length``) with every
token a label, so the objectives' masks (``labels != -100``) cover the whole text. With
``windows=True`` the rows are instead MUSE's: all texts of a role joined and cut into
``max_length``-token windows (``data/windows.py``), so no text is cut short. The batches are
those of the record data modules (``FineTuneDataModule``, ``UnlearningDataModule``: the same
shuffling, retain pairing, reference loaders and resumable sampler).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_unlearn.data.collate import TrainCollator
from lightning_unlearn.data.datamodule import (
    FineTuneDataModule,
    PairedDataset,
    UnlearningDataModule,
    _Flatten,
    check_at_least,
)
from lightning_unlearn.data.multiple_choice import load_texts
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.data.windows import window_rows
from lightning_unlearn.errors import UserError


@dataclass
class Corpus:
    """A text corpus: a hub id with ``config`` and ``split`` (``cais/wmdp-corpora``,
    ``wikitext``), a local directory in the hub's layout, or a ``.json``/``.jsonl``/``.parquet``
    file; ``field`` holds the text; texts under ``min_chars`` are dropped; the first ``limit`` kept."""

    source: str
    config: str | None = None
    split: str = "train"
    field: str = "text"
    min_chars: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        check_at_least(1, "corpus", limit=self.limit)
        check_at_least(0, "corpus", min_chars=self.min_chars)

    def texts(self) -> list[str]:
        return load_texts(self.source, self.config, self.split, self.field, self.min_chars)[: self.limit]


def encode_texts(texts: list[str], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Every text's token ids (truncated to ``max_length``), each one a label."""
    out = []
    for text in texts:
        ids = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        if len(ids) < 2:
            continue  # nothing to predict
        out.append({"input_ids": ids, "labels": list(ids)})
    if not out:
        raise UserError("the corpus holds no text of at least 2 tokens")
    return out


def encode_corpus(texts: list[str], tokenizer, max_length: int, windows: bool) -> list[dict[str, list[int]]]:
    """The training rows of ``texts``: MUSE's windows over their join, or one row per text."""
    return (window_rows if windows else encode_texts)(texts, tokenizer, max_length)


class TextDataModule(FineTuneDataModule):
    """Causal-LM batches of the texts of ``corpora`` (fine-tuning a target on documents); with
    ``windows`` the rows are ``max_length``-token windows over all texts joined, as MUSE trains."""

    def __init__(
        self,
        tokenizer: str,
        corpora: list[Corpus],
        max_length: int = 512,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        windows: bool = False,
    ) -> None:
        super().__init__(
            tokenizer, max_length=max_length, batch_size=batch_size, num_workers=num_workers, seed=seed
        )
        if not corpora:
            raise UserError("data.corpora is empty: name at least one corpus")
        self.corpora, self.windows = corpora, windows

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            tokenizer = load_tokenizer(self.tokenizer_path)
            self.collator = TrainCollator(tokenizer.pad_token_id)
            texts = [t for corpus in self.corpora for t in corpus.texts()]
            self.dataset = encode_corpus(texts, tokenizer, self.max_length, self.windows)


class CorpusUnlearningDataModule(UnlearningDataModule):
    """Batches ``{"forget", "retain"}`` of texts: every forget text (of all ``forget`` corpora,
    in order) with ``retain_per_forget`` retain texts drawn per epoch, as ``UnlearningDataModule``
    pairs records. WMDP's RMU alternates its two forget corpora step by step, each with its own
    steering coefficient; here they are one pool with one coefficient. With ``windows`` the forget
    and the retain rows are each MUSE's ``max_length``-token windows over that role's texts joined
    (forget window i is still paired with randomly drawn retain windows; MUSE pairs it with
    retain window i mod the retain count)."""

    def __init__(
        self,
        tokenizer: str,
        forget: list[Corpus],
        retain: list[Corpus],
        max_length: int = 512,
        batch_size: int = 4,
        retain_per_forget: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        windows: bool = False,
    ) -> None:
        super().__init__(
            tokenizer, source="", forget_split="forget", retain_split="retain", max_length=max_length,
            batch_size=batch_size, retain_per_forget=retain_per_forget, seed=seed, num_workers=num_workers,
        )  # fmt: skip
        if not forget or not retain:
            raise UserError("data.forget and data.retain must each name at least one corpus")
        self.forget_corpora, self.retain_corpora, self.windows = forget, retain, windows

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        tokenizer = self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.collator = _Flatten(tokenizer.pad_token_id)
        forget_texts = [t for corpus in self.forget_corpora for t in corpus.texts()]
        retain_texts = [t for corpus in self.retain_corpora for t in corpus.texts()]
        self.forget_records = [{"id": str(i), "text": t} for i, t in enumerate(forget_texts)]
        forget = encode_corpus(forget_texts, tokenizer, self.max_length, self.windows)
        retain = encode_corpus(retain_texts, tokenizer, self.max_length, self.windows)
        self.dataset = PairedDataset(forget, retain, self.seed, self.retain_per_forget)
