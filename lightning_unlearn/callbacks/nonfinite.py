"""NonFiniteGuard: stop fit at a nan/inf training loss, before the update that would absorb it,
with the last good weights exported.

Every objective installs it through ``configure_callbacks`` while its ``stop_on_nonfinite`` is
true (the default), so the CLI, the protocol and sequential runs have it without a config entry.
It works for any LightningModule with an ``export(directory, merge=False)`` method.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_unlearn.errors import UserError
from lightning_unlearn.models import named_trainable
from lightning_unlearn.sharding import local_shard

# A loss's kind of non-finiteness, ordered so a max over ranks reports the worst: nan beats inf.
NONFINITE_KINDS = ("finite", "-inf", "inf", "nan")


class NonFiniteLoss(UserError):
    """The training loss became nan or inf; ``directory`` holds the last good weights (None when
    the first step of the fit already failed, so nothing was trained and nothing written)."""

    def __init__(self, message: str, step: int, last_good_step: int | None, directory: Path | None) -> None:
        super().__init__(message)
        self.step, self.last_good_step, self.directory = step, last_good_step, directory


class NonFiniteGuard(Callback):
    """Snapshot the trainable parameters at every step whose losses were all finite; at a
    non-finite loss restore that snapshot, export it to ``<log_dir>/last_good`` and raise
    ``NonFiniteLoss``.

    The snapshot is a copy of the trainable parameters (this rank's shards) on their device: small
    for a LoRA, a second copy of the model for full fine-tuning. It is a plain dict, never part of
    a checkpoint, and is freed when fit ends.
    """

    def __init__(self) -> None:
        self._last_good: dict[str, Tensor] = {}
        self._last_good_step: int | None = None

    def forget(self) -> None:
        """The trainable weights were replaced (a new deletion request's adapter): the snapshot
        is no fallback for them, so a non-finite first step writes nothing."""
        self._last_good_step = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A snapshot from an earlier fit is not a good state of this one.
        self._last_good_step = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_good, self._last_good_step = {}, None  # free the copy (a whole model when full FT)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Snapshot the weights w_t of step t: every loss of this step was finite (else
        ``on_before_backward`` had stopped the run) and the optimizer has not moved them yet."""
        with torch.no_grad():
            for name, param in named_trainable(pl_module):
                local, kept = local_shard(param), self._last_good.get(name)
                if kept is not None and kept.shape == local.shape and kept.dtype == local.dtype:
                    kept.copy_(local)
                else:
                    self._last_good[name] = local.detach().clone()
        self._last_good_step = trainer.global_step

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Stop at a nan/inf loss before its gradient reaches the weights.

        Every rank learns whether any rank's loss is non-finite (a max all-reduce, so all stop
        together instead of some waiting in the next collective). The weights that produced the
        bad loss, w_k, came out of the update of step k-1, which is what diverged (a finite loss
        can still give inf gradients), so they are not kept. The last good weights are w_j, the
        weights at which the last fully finite step j (j = k-1 without a resume in between) was
        evaluated: they are written back into the model, exported with ``export(merge=False)``
        (a peft adapter, or the whole model without one) to ``<log_dir>/last_good`` (the logger's
        run directory, ``default_root_dir`` without a logger), and ``NonFiniteLoss`` (a
        ``UserError``) names both steps and the directory. Nothing else is written: Lightning
        skips ``on_fit_end`` (so ``ExportModel``) when fit raises.
        """
        value = loss.detach().float()
        code = torch.where(value.isnan(), 3, torch.where(value.isposinf(), 2, value.isneginf().long()))
        code = code.max().float()
        if trainer.world_size > 1:
            code = trainer.strategy.reduce(code, reduce_op="max")
        worst = int(code.item())  # one scalar sync per backward: negligible beside the step
        if worst == 0:
            return
        kind, step, epoch = NONFINITE_KINDS[worst], trainer.global_step, trainer.current_epoch
        what = "adapter" if getattr(pl_module, "adapter_spec", None) is not None else "model"
        if self._last_good_step is None:
            raise NonFiniteLoss(
                f"non-finite training loss ({kind}) at epoch {epoch}, step {step}, the first step of "
                f"this fit: stopped, nothing written (the starting weights already give it: check the "
                f"model, the data and the precision)",
                step,
                None,
                None,
            )
        self._restore(pl_module)
        directory = Path(trainer.log_dir or trainer.default_root_dir) / "last_good"
        pl_module.export(directory, merge=False)
        trainer.strategy.barrier("nonfinite_export")  # no rank exits before rank 0 has written
        good = self._last_good_step
        raise NonFiniteLoss(
            f"non-finite training loss ({kind}) at epoch {epoch}, step {step}: stopped before the "
            f"update; the last good {what} (the weights at step {good}, whose loss was finite) is in "
            f"{directory}",
            step,
            good,
            directory,
        )

    def _restore(self, pl_module: LightningModule) -> None:
        """Write the snapshot back into the live parameters. FSDP2 leaves a unit gathered between
        forward and backward unless it reshards after forward (``fully_shard_model`` asks for
        that; torch's own default keeps the root gathered): reshard first, so every parameter is
        its sharded DTensor again and the snapshot's shards land in the storage FSDP2 owns."""
        from torch.distributed.fsdp import FSDPModule

        for module in pl_module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        with torch.no_grad():
            for name, param in named_trainable(pl_module):
                local = local_shard(param)
                if name not in self._last_good or self._last_good[name].shape != local.shape:
                    raise RuntimeError(f"last good snapshot does not fit parameter {name}")
                local.copy_(self._last_good[name])
