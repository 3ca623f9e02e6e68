"""Small helpers shared by the objective tests: build an objective outside a Trainer, take a
plain SGD step, and Hugging Face's own loss as the independent reference."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from lightning import Callback


def first_batch(datamodule) -> dict:
    return next(iter(datamodule.train_dataloader()))


def hf_nll(model, sub: dict) -> torch.Tensor:
    """Hugging Face's own causal-LM loss: the independent reference for our nll_loss."""
    return model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], labels=sub["labels"]).loss


def build(cls, spec, **kwargs):
    """``cls`` with its model loaded; torch is seeded first so LoRA initialisations agree."""
    torch.manual_seed(0)
    objective = cls(model=spec, **kwargs)
    objective.configure_model()
    return objective


def sgd_step(objective, batch: dict, lr: float = 0.5) -> None:
    """One plain gradient step on ``objective``'s training loss."""
    objective.model.zero_grad()
    objective.training_step(batch, 0).backward()
    with torch.no_grad():
        for p in objective.parameters():
            if p.grad is not None:
                p -= lr * p.grad


class PauseAt(Callback):
    """Test harness for kill-and-resume: when ``LU_PAUSE_AT_STEP`` is set, after that global step
    touch ``LU_PAUSE_MARKER`` and sleep, so the test can send a real signal mid-run. Unset, it
    does nothing, so the resumed run is the same command."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = os.environ.get("LU_PAUSE_AT_STEP")
        if step is not None and trainer.global_step == int(step):
            Path(os.environ["LU_PAUSE_MARKER"]).touch()
            time.sleep(600)


def fit_lbfgs(model, params: list[torch.Tensor], batches: list[dict], n_train: int, weight_decay: float,
              max_iter: int) -> float:  # fmt: skip
    """L-BFGS to a stationary point of (1/n_train) sum_i l_i + (weight_decay/2) ||theta||^2 (the
    influence step's premise); returns the gradient norm reached. Always 1/n_train: dropping rows
    must not reweight the penalty."""
    from lightning_unlearn.influence import flatten, per_example_loss

    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, history_size=50, tolerance_grad=1e-9,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")  # fmt: skip

    def objective():
        loss = sum(per_example_loss(model, b).sum() for b in batches) / n_train
        return loss + weight_decay / 2 * flatten(params).pow(2).sum()

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    return flatten(torch.autograd.grad(objective(), params)).norm().item()


def forget10_data(world_dir, tokenizer_dir: str, batch_size: int) -> dict:
    """The ``data:`` block of a subprocess fit config: the test world's forget10 / retain90."""
    return {
        "class_path": "lightning_unlearn.data.datamodule.UnlearningDataModule",
        "init_args": {
            "tokenizer": tokenizer_dir,
            "source": str(world_dir),
            "forget_split": "forget10",
            "retain_split": "retain90",
            "batch_size": batch_size,
            "max_length": 64,
        },
    }


class WaitForSignal(Callback):
    """Test harness for preemption: when ``LU_SIGNAL_AT_STEP`` is set, once the global step reaches
    it (at the end of that training batch, or with ``LU_SIGNAL_IN=validation`` in the validation
    batch after it) the rank ``LU_SIGNAL_RANK`` (default 0) writes its pid to ``LU_SIGNAL_MARKER``
    and waits, at most a minute, for the test to send it a real signal. Unset, it does nothing."""

    def __init__(self) -> None:
        self.done = False

    def _wait(self, trainer, where: str) -> None:
        from lightning_unlearn import preemption

        step = os.environ.get("LU_SIGNAL_AT_STEP")
        if step is None or self.done or os.environ.get("LU_SIGNAL_IN", "train") != where:
            return
        if trainer.global_step < int(step) or trainer.global_rank != int(
            os.environ.get("LU_SIGNAL_RANK", "0")
        ):
            return
        self.done = True
        marker = Path(os.environ["LU_SIGNAL_MARKER"])
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        marker.with_suffix(".tmp").rename(marker)
        deadline = time.time() + 60
        while preemption.received() is None and time.time() < deadline:
            time.sleep(0.01)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._wait(trainer, "train")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._wait(trainer, "validation")


def record_fits(monkeypatch) -> list[str]:
    """The class names of the modules every ``SafeTrainer.fit`` trains from now on (the protocol's
    and the sweep's Trainer), to tell which stages really trained."""
    from lightning_unlearn.safe_load import SafeTrainer

    fitted: list[str] = []
    fit = SafeTrainer.fit
    monkeypatch.setattr(
        SafeTrainer,
        "fit",
        lambda self, model, **k: fitted.append(type(model).__name__) or fit(self, model, **k),
    )
    return fitted
