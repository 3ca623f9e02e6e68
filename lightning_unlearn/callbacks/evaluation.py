"""UnlearningEvaluation: the evaluation suite during unlearning, so the stopping point can be chosen
from forget quality and model utility rather than a fixed epoch count (forget quality rises, peaks
and falls as unlearning overshoots the retain model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

from lightning_unlearn.data.formatting import PromptFormat
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.evaluation import Evaluator, load_eval_splits
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.io import write_text_atomic
from lightning_unlearn.models import load_spec_tokenizer
from lightning_unlearn.report import Report

DEFAULT_SPLITS = {"forget": "forget01_perturbed", "retain": "retain_perturbed"}
# Beside a kept best model: the evaluation it is (its step), for whoever exports it later.
BEST_EVALUATION = "evaluation.json"


def beats(entry: dict, best: dict | None, monitor: str, mode: str, tie: str | None) -> bool:
    """``entry`` is better than ``best`` by ``monitor`` (higher with ``mode`` max); on a tie, by a
    higher ``tie`` metric (the first ``min_ratio`` one: model utility in the shipped rules). A KS
    p-value over a few dozen questions takes few distinct values, so two checkpoints often tie on
    forget quality; the one that kept more utility is the better model. Else the earlier stays."""
    if best is None:
        return True
    value, held = entry[monitor], best[monitor]
    if value != held:
        return value > held if mode == "max" else value < held
    return tie is not None and entry.get(tie, -math.inf) > best.get(tie, -math.inf)


class UnlearningEvaluation(Callback):
    """Evaluate before training, every ``every_n_epochs`` epochs and at the end of fit; log the
    metrics as ``eval/<name>`` to every logger (generations as a table on WandbLogger), keep the
    history, and optionally export the best model by ``monitor`` under constraints.

    Each ``eval/<name>`` is also put in ``trainer.callback_metrics``, so Lightning's own
    ``EarlyStopping`` and ``ModelCheckpoint`` can monitor it (e.g. ``eval/forget_quality_holdout``,
    mode max, or ``eval/mia_gap``, mode min: stopping rules that need no retain model). Lightning
    runs those monitoring callbacks after this one at each epoch end, so they see this epoch's
    evaluation.

    Args:
        source: ``locuslab/TOFU`` or a local directory in its layout.
        splits: role -> split name, as for ``lightning-unlearn evaluate``.
        limit: evaluate the first N rows of each split.
        retain_report: the retain model's report, for forget_quality.
        tokenizer: defaults to the objective's model's tokenizer.
        prompt_format / max_length: how the model reads its input (as its data module encodes it).
        batch_size, max_new_tokens, generation_batch_size, fast, cosine_model, nli_model: the
            ``EvaluationSettings`` (``lightning_unlearn.evaluation_settings``); a shorter default
            generation budget than the ``evaluate`` command's, as this runs during training.
        every_n_epochs: evaluate after every N training epochs.
        every_n_steps: evaluate after every N optimizer steps instead (epochs are then ignored).
        monitor: metric that picks the best evaluation (e.g. ``forget_quality``); None keeps none.
        mode: ``max`` or ``min`` for ``monitor``.
        min_ratio: constraints relative to the evaluation before training, e.g.
            ``{model_utility: 0.9}`` keeps only evaluations with at least 0.9x the start's utility.
        best_dirpath: where the best model is exported (adapter only for LoRA runs).
        history_path: a JSON file for the history (rewritten atomically after each evaluation).
        start: the metrics of the model as training starts, when they are known already (a sweep
            or protocol passes the target's report): the step-0 entry, instead of evaluating the
            same model again. The start is the reference of ``min_ratio``, never the best: a kept
            model is one that unlearned.
    """

    def __init__(
        self,
        source: str = "locuslab/TOFU",
        splits: dict[str, str] | None = None,
        limit: int | None = None,
        retain_report: str | None = None,
        tokenizer: str | None = None,
        prompt_format: PromptFormat | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 64,
        max_length: int = 512,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        monitor: str | None = None,
        mode: str = "max",
        min_ratio: dict[str, float] | None = None,
        best_dirpath: str | None = None,
        history_path: str | None = None,
        cosine_model: str | None = None,
        nli_model: str | None = None,
        generation_batch_size: int | None = None,
        fast: bool = True,
        start: dict[str, float] | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise UserError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        if every_n_steps is not None and every_n_steps < 1:
            raise UserError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if mode not in ("max", "min"):
            raise UserError(f"mode must be 'max' or 'min', got {mode!r}")
        if (monitor is None) != (best_dirpath is None):
            raise UserError("set monitor and best_dirpath together to keep the best model")
        self.source, self.splits, self.limit = source, dict(splits or DEFAULT_SPLITS), limit
        self.retain_report, self.tokenizer = retain_report, tokenizer
        self.prompt_format, self.max_length = prompt_format or PromptFormat(), max_length
        self.settings = EvaluationSettings(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            generation_batch_size=generation_batch_size,
            fast=fast,
            cosine_model=cosine_model,
            nli_model=nli_model,
        )
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.monitor, self.mode, self.start = monitor, mode, start
        self.min_ratio, self.best_dirpath, self.history_path = (
            dict(min_ratio or {}),
            best_dirpath,
            history_path,
        )
        self.evaluator: Evaluator | None = None  # the protocol injects its own
        self.periodic = True  # SequentialForgetting turns this off and calls evaluate() itself
        self.history: list[dict] = []
        self.best: dict | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.evaluator is not None:
            return
        splits = load_eval_splits(self.source, self.splits, self.limit)
        if self.tokenizer:
            tokenizer = load_tokenizer(self.tokenizer)
        else:
            tokenizer = load_spec_tokenizer(pl_module.model_spec)
        self.evaluator = self.settings.evaluator(
            tokenizer,
            splits,
            prompt_format=self.prompt_format,
            max_length=self.max_length,
            retain_truth_ratios=self.retain_report,
            progress=False,
        )

    # -- when ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.history:  # a run resumed from a checkpoint has its start evaluated already
            return
        if self.start is None:
            self.evaluate(trainer, pl_module)
            return
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **self.start})
        self._write_history(trainer)

    def state_dict(self) -> dict:
        # In every checkpoint, so a resumed run (a preempted one, mid-epoch) keeps its history.
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history, self.best = list(state_dict["history"]), state_dict["best"]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        step = trainer.global_step  # optimizer steps: a batch that only accumulates repeats it
        due = self.periodic and self.every_n_steps and step % self.every_n_steps == 0
        if due and self.history[-1]["step"] != step:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self.periodic
            and self.every_n_steps is None
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        ):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self.evaluate(trainer, pl_module)

    # -- what ----------------------------------------------------------------------------------
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> Report:
        """Every rank calls this: the Evaluator shards each split across ranks and gathers the
        per-sample values before the KS tests and AUCs, so every rank gets the whole report."""
        report = self.evaluator.run(pl_module.model)
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step, **report.metrics}
        self.history.append(entry)
        logged = {f"eval/{k}": v for k, v in report.metrics.items()}
        # float64: p-values far below float32's range still order correctly for a monitor.
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in logged.items()})
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
            if hasattr(logger, "log_text") and "forget" in report.generations:
                rows = [[g["question"], g["answer"], g["generated"]] for g in report.generations["forget"]]
                logger.log_text(
                    key="eval/forget_generations", columns=["question", "answer", "generated"], data=rows
                )
        if self.monitor is not None and len(self.history) > 1:  # the start is the reference
            self._keep_if_best(trainer, pl_module, entry)
        self._write_history(trainer)
        return report

    def _write_history(self, trainer: Trainer) -> None:
        if self.history_path and trainer.is_global_zero:
            write_text_atomic(Path(self.history_path), json.dumps(self.history, indent=1) + "\n")

    def _keep_if_best(self, trainer: Trainer, pl_module: LightningModule, entry: dict) -> None:
        value = entry.get(self.monitor)
        if value is None or math.isnan(value):
            raise UserError(f"monitor '{self.monitor}' is not among the metrics: {', '.join(entry)}")
        start = self.history[0]
        unknown = [m for m in self.min_ratio if m not in start]
        if unknown:
            raise UserError(f"min_ratio names unknown metric(s) {unknown}: choose from {', '.join(start)}")
        if not all(entry[m] >= r * start[m] for m, r in self.min_ratio.items()):  # nan fails
            return
        if beats(entry, self.best, self.monitor, self.mode, next(iter(self.min_ratio), None)):
            self.best = entry
            pl_module.export(self.best_dirpath, merge=False)  # every rank gathers, rank 0 writes
            if trainer.is_global_zero:
                write_text_atomic(
                    Path(self.best_dirpath) / BEST_EVALUATION, json.dumps(entry, indent=1) + "\n"
                )
