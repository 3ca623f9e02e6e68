"""MUSE's windows (``data/windows.py``): literal hand-cut rows, an independent cut of a byte-level
BPE tokenization of the joined text, every token trained on once per epoch, the unchanged
per-document rows without windows, and the rows per epoch of a tiny MUSE run."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import TINY_LLAMA
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lightning_unlearn.data.corpora import Corpus, CorpusUnlearningDataModule, TextDataModule
from lightning_unlearn.data.muse import load_documents
from lightning_unlearn.data.synthetic_muse import MuseWorldConfig, make_muse_world
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.data.windows import window_rows
from lightning_unlearn.errors import ConfigError, UserError

BOS, EOS = "<s>", "</s>"


def _letters(bos: bool) -> PreTrainedTokenizerFast:
    """Word-level over a..j: "a" is id 3 ... "j" id 12; <s> is 2."""
    vocab = {"<pad>": 0, EOS: 1, BOS: 2, **{chr(ord("a") + i): 3 + i for i in range(10)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token=EOS, bos_token=BOS if bos else None
    )


@pytest.mark.parametrize(
    ("bos", "max_length", "expected"),
    [
        # 10 tokens 3..12; BOS-led windows of 3 tokens; the last filled with the first window's start
        (True, 4, [[2, 3, 4, 5], [2, 6, 7, 8], [2, 9, 10, 11], [2, 12, 2, 3]]),
        # no BOS: windows of 4, the last [11, 12] filled with 3, 4
        (False, 4, [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 3, 4]]),
        (False, 5, [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]),  # exact: nothing filled
        (True, 16, [[2, *range(3, 13), 2, 3, 4, 5, 6]]),  # one window, filled from itself
    ],
)
def test_windows_hand_cut(bos, max_length, expected):
    rows = window_rows(["a b c d e", "f g h i j"], _letters(bos), max_length)
    assert [r["input_ids"] for r in rows] == expected
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_windows_refuse_empty_corpus_and_no_room():
    with pytest.raises(UserError, match="no text"):
        window_rows(["", ""], _letters(True), 4)
    with pytest.raises(ConfigError, match="max_length must be at least 2"):
        window_rows(["a b"], _letters(True), 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    config = MuseWorldConfig(n_forget=3, n_retain1=3, n_retain2=1, n_holdout=1, n_facts=6)
    return make_muse_world(tmp_path_factory.mktemp("windows") / "world", config)


def _texts(world: Path, split: str) -> list[str]:
    return load_documents(world, "raw", split)


@pytest.fixture(scope="module")
def bpe_dir(world, tmp_path_factory) -> str:
    """A byte-level BPE with a Llama-like BOS post-processor, trained on the documents: newlines
    are tokens, so the separator is visible, and decoding gives back the text exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_texts(world, "forget") + _texts(world, "retain1"), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    out = tmp_path_factory.mktemp("bpe") / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS).save_pretrained(out)
    return str(out)


def _hand_cut(ids: list[int], bos: int, max_length: int) -> list[list[int]]:
    rows, position = [], 0
    while position < len(ids):
        rows.append([bos] + ids[position : position + max_length - 1])
        position += max_length - 1
    rows[-1] += rows[0][: max_length - len(rows[-1])]
    return rows


def test_text_windows_equal_an_independent_cut(world, bpe_dir):
    """TextDataModule(windows=True) rows equal the joined text tokenized and cut by hand, and their
    tokens (BOS and the filler removed) decode to the documents joined by a blank line."""
    tokenizer = load_tokenizer(bpe_dir)
    docs = _texts(world, "forget")
    joined = "\n\n".join(docs)
    ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
    dm = TextDataModule(bpe_dir, [Corpus(str(world), "raw", "forget")], max_length=32, windows=True)
    dm.setup("fit")
    expected = _hand_cut(ids, tokenizer.bos_token_id, 32)
    assert len(expected) == math.ceil(len(ids) / 31) > 3
    assert [r["input_ids"] for r in dm.dataset] == expected
    body = [t for r in dm.dataset for t in r["input_ids"][1:]][: len(ids)]
    assert tokenizer.decode(body) == joined and "\n\n" in joined


def test_every_token_once_per_epoch(world, bpe_dir):
    """One epoch of the unlearning loader hands out every forget window once: the corpus's tokens
    each once, plus the last window's filler (the first window's start) once more; the order is
    the seed's."""
    tokenizer = load_tokenizer(bpe_dir)
    corpus = {r: [Corpus(str(world), "raw", s)] for r, s in (("forget", "forget"), ("retain", "retain1"))}

    def epoch(seed: int) -> list[tuple[int, list[int]]]:
        dm = CorpusUnlearningDataModule(
            bpe_dir, corpus["forget"], corpus["retain"], max_length=24, batch_size=3, seed=seed, windows=True
        )
        dm.setup("fit")
        out = []
        for batch in dm.train_dataloader():
            sub = batch["forget"]
            assert sub["attention_mask"].all() and (sub["labels"] == sub["input_ids"]).all()
            assert sub["input_ids"].shape[1] == 24 and batch["retain"]["input_ids"].shape[1] == 24
            out += zip(sub["index"].tolist(), sub["input_ids"].tolist(), strict=True)
        return out

    seen = epoch(seed=0)
    ids = tokenizer(
        "\n\n".join(_texts(world, "forget")), add_special_tokens=False
    )["input_ids"]  # fmt: skip
    n_rows = math.ceil(len(ids) / 23)
    assert sorted(i for i, _ in seen) == list(range(n_rows))
    rows = [row[1:] for _, row in sorted(seen)]  # BOS dropped
    filler = n_rows * 23 - len(ids)
    trained = [t for row in rows for t in row]
    assert trained[: len(ids)] == ids
    # the filler: BOS, then the corpus's first tokens
    assert trained[len(ids) :] == [tokenizer.bos_token_id, *ids[: filler - 1]][:filler]
    assert Counter(trained) == Counter(ids) + Counter(trained[len(ids) :])
    assert seen == epoch(seed=0) and [i for i, _ in seen] != [i for i, _ in epoch(seed=1)]


def test_without_windows_each_document_is_a_row(world, bpe_dir):
    """Without windows a document is its own row: its default special tokens, cut at max_length."""
    tokenizer = load_tokenizer(bpe_dir)
    docs = _texts(world, "forget")
    dm = TextDataModule(bpe_dir, [Corpus(str(world), "raw", "forget")], max_length=24)
    dm.setup("fit")
    expected = [
        [tokenizer.bos_token_id, *tokenizer(d, add_special_tokens=False)["input_ids"]][:24] for d in docs
    ]
    assert [r["input_ids"] for r in dm.dataset] == expected


def test_muse_run_trains_one_row_per_window(tmp_path, monkeypatch):
    """A tiny MUSE run with ``data.windows``: an unlearning epoch takes ceil(n / max_length) forget
    rows (the generated tokenizer has no BOS), n the tokens of raw/forget joined."""
    from lightning_unlearn import benchmark_run
    from lightning_unlearn.cli import build_muse

    datamodules = {}
    real = benchmark_run.train_stage

    def recording(run_dir, stage_name, stage, spec, datamodule, *args):
        datamodules[stage_name] = datamodule
        return real(run_dir, stage_name, stage, spec, datamodule, *args)

    monkeypatch.setattr(benchmark_run, "train_stage", recording)
    config = {
        "name": "w",
        "model": {"config": {**TINY_LLAMA, "max_position_embeddings": 256}},
        "retrain_auc": 0.5,
        "data": {"world": {"n_forget": 2, "n_retain1": 2, "n_retain2": 1, "n_holdout": 1}, "max_length": 16,
                 "windows": True},
        "unlearn": {"ga": {"objective": {"class_path": "lightning_unlearn.objectives.GradAscent"},
                           "max_epochs": 2, "batch_size": 1}},
        "evaluation": {"verbmem_max_new_tokens": 4, "knowmem_max_new_tokens": 4},
    }  # fmt: skip
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(config))
    run = build_muse(["--config", str(tmp_path / "w.yaml"), "--out_dir", str(tmp_path)])
    run.run()
    world = tmp_path / "w" / "world"
    tokenizer = load_tokenizer(str(world / "tokenizer"))
    assert tokenizer.bos_token_id is None

    def n_tokens(split: str) -> int:
        return len(tokenizer("\n\n".join(_texts(world, split)), add_special_tokens=False)["input_ids"])

    dm = datamodules["ga"]
    rows = math.ceil(n_tokens("forget") / 16)
    assert (
        rows > 2
        and len(dm.dataset.forget) == rows
        and len(dm.dataset.retain) == math.ceil(n_tokens("retain1") / 16)
    )
    assert dm.trainer.global_step == 2 * rows


def test_windows_resume_mid_epoch(world, bpe_dir):
    """A loader restored from a mid-epoch state hands out the rest of the uninterrupted epoch."""
    corpora = [Corpus(str(world), "raw", "forget")], [Corpus(str(world), "raw", "retain1")]

    def loader():
        dm = CorpusUnlearningDataModule(bpe_dir, *corpora, max_length=24, batch_size=2, windows=True)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader()
    batches = iter(first)
    seen = [next(batches)["forget"]["index"].tolist() for _ in range(2)]
    state = first.state_dict()
    again = loader()
    again.load_state_dict(state)
    rest = [b["forget"]["index"].tolist() for b in again]
    whole = [b["forget"]["index"].tolist() for b in loader()]
    assert seen + rest == whole and len(rest) >= 2
