"""UnlearningEvaluation during fit: its history against an independent Evaluator run, metrics in
the logger, and the best model kept under a constraint."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_unlearn.callbacks import UnlearningEvaluation
from lightning_unlearn.data.datamodule import UnlearningDataModule
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.evaluation import Evaluator
from lightning_unlearn.models import LoraSpec, load_adapter, load_model
from lightning_unlearn.objectives import GradAscent

SPLITS = {"forget": "forget10_perturbed", "retain": "retain_perturbed"}


def _fit(tmp_path, tiny_spec, world_dir, tokenizer_dir, **callback_args):
    torch.manual_seed(0)
    objective = GradAscent(
        model=tiny_spec, adapter=LoraSpec(r=4, alpha=8), optimizer=lambda p: torch.optim.SGD(p, lr=2.0)
    )
    data = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10",
                                retain_split="retain90", batch_size=5, max_length=64)  # fmt: skip
    callback = UnlearningEvaluation(
        source=str(world_dir), splits=SPLITS, limit=6, max_new_tokens=4, max_length=64, **callback_args
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=CSVLogger(tmp_path, name="log", version=0),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    )  # fmt: skip
    trainer.fit(objective, datamodule=data)
    return objective, callback


def _evaluate(model, world_dir, tokenizer_dir):
    splits = {role: load_split(world_dir, name)[:6] for role, name in SPLITS.items()}
    return Evaluator(
        load_tokenizer(tokenizer_dir), splits, max_new_tokens=4, max_length=64, progress=False
    ).run(model)


def test_history_logs_and_best_model(tmp_path, tiny_spec, world_dir, tokenizer_dir):
    objective, callback = _fit(
        tmp_path, tiny_spec, world_dir, tokenizer_dir, monitor="forget_Q_A_Prob", mode="min",
        min_ratio={"retain_Q_A_Prob": 0.5}, best_dirpath=str(tmp_path / "best"),
        history_path=str(tmp_path / "history.json"),
    )  # fmt: skip
    history = callback.history
    assert [h["epoch"] for h in history] == [0, 0, 1, 2] and [h["step"] for h in history] == [0, 2, 4, 6]
    assert json.loads((tmp_path / "history.json").read_text()) == history
    # The last evaluation is the fitted model's, computed independently after fit.
    final = _evaluate(objective.model, world_dir, tokenizer_dir)
    assert history[-1]["forget_Q_A_Prob"] == pytest.approx(final.metrics["forget_Q_A_Prob"], rel=1e-5)
    assert history[-1]["forget_Q_A_Prob"] < history[0]["forget_Q_A_Prob"]  # gradient ascent forgets
    # Every evaluation reached the logger.
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        logged = [
            float(r["eval/forget_Q_A_Prob"]) for r in csv.DictReader(f) if r.get("eval/forget_Q_A_Prob")
        ]
    assert logged == pytest.approx([h["forget_Q_A_Prob"] for h in history], rel=1e-6)
    # The best: lowest forget Prob among evaluations keeping half the start's retain Prob.
    allowed = [h for h in history if h["retain_Q_A_Prob"] >= 0.5 * history[0]["retain_Q_A_Prob"]]
    assert callback.best == min(allowed, key=lambda h: h["forget_Q_A_Prob"])
    best = load_adapter(load_model(tiny_spec), str(tmp_path / "best"))
    kept = _evaluate(best, world_dir, tokenizer_dir)
    assert kept.metrics["forget_Q_A_Prob"] == pytest.approx(callback.best["forget_Q_A_Prob"], rel=1e-5)


def test_impossible_constraint_keeps_nothing_and_bad_settings_fail(
    tmp_path, tiny_spec, world_dir, tokenizer_dir
):
    _, callback = _fit(
        tmp_path, tiny_spec, world_dir, tokenizer_dir, monitor="forget_Q_A_Prob", mode="min",
        min_ratio={"retain_Q_A_Prob": 10.0}, best_dirpath=str(tmp_path / "best"),
    )  # fmt: skip
    assert callback.best is None and not (tmp_path / "best").exists()
    with pytest.raises(UserError, match="monitor and best_dirpath together"):
        UnlearningEvaluation(monitor="forget_quality")
    with pytest.raises(UserError, match="mode must be"):
        UnlearningEvaluation(mode="best")


class RecordingLogger(Logger):
    """A logger with WandbLogger's ``log_text``: records what the callback sends."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []
        self.tables: list[dict] = []

    name = "recording"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_text(self, key, columns, data) -> None:
        self.tables.append({"key": key, "columns": columns, "data": data})


def test_generations_go_to_loggers_that_take_tables(tmp_path, tiny_spec, world_dir, tokenizer_dir):
    logger = RecordingLogger()
    callback = UnlearningEvaluation(
        source=str(world_dir), splits=SPLITS, limit=3, max_new_tokens=4, max_length=64
    )
    objective = GradAscent(model=tiny_spec, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    data = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10",
                                retain_split="retain90", batch_size=5, max_length=64)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=logger, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(objective, datamodule=data)
    assert len(logger.tables) == len(callback.history) == 2
    forget = load_split(world_dir, "forget10_perturbed")[:3]
    last = logger.tables[-1]
    assert last["key"] == "eval/forget_generations" and last["columns"] == ["question", "answer", "generated"]
    assert [row[:2] for row in last["data"]] == [[r["question"], r["answer"]] for r in forget]
    evals = [m for _, m in logger.metrics if "eval/forget_Q_A_Prob" in m]
    assert [m["eval/forget_Q_A_Prob"] for m in evals] == [h["forget_Q_A_Prob"] for h in callback.history]
