"""Shared fixtures: a miniature synthetic world and a tiny Llama built from a config (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    from lightning_unlearn.data.synthetic import WorldConfig, make_world

    config = WorldConfig(seed=0, n_authors=10, n_forget_authors=1, n_world_facts=10, n_eval_retain_authors=2)
    return make_world(tmp_path_factory.mktemp("world") / "world", config)


@pytest.fixture(scope="session")
def tokenizer_dir(world_dir) -> str:
    return str(world_dir / "tokenizer")


@pytest.fixture
def tiny_spec(tokenizer_dir):
    from lightning_unlearn.models import ModelSpec

    return ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir)


@pytest.fixture
def unlearning_data(world_dir, tokenizer_dir):
    from lightning_unlearn.data.datamodule import UnlearningDataModule

    dm = UnlearningDataModule(
        tokenizer=tokenizer_dir,
        source=str(world_dir),
        forget_split="forget10",
        retain_split="retain90",
        batch_size=4,
        max_length=64,
    )
    dm.setup("fit")
    return dm


@pytest.fixture
def idk_data(world_dir, tokenizer_dir):
    """``unlearning_data`` with built-in refusals: batches also carry forget_idk and retain_idk."""
    from lightning_unlearn.data.datamodule import UnlearningDataModule

    dm = UnlearningDataModule(
        tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10", retain_split="retain90",
        batch_size=4, max_length=64, refusals="builtin",
    )  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.fixture
def no_logging(monkeypatch):
    """training_step logs through self.log; outside a Trainer that is a no-op we do not need."""
    import lightning as L

    monkeypatch.setattr(L.LightningModule, "log", lambda *a, **k: None)


@pytest.fixture(scope="module")
def one_thread():
    """Influence tests run thousands of tiny ops: with a second intra-op thread on a busy 2-core
    machine they ran 40x slower (OpenMP threads spin waiting for each other)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
