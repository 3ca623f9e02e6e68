"""Gradient ascent (GA) and gradient difference (GD): the simplest baselines."""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.errors import UserError
from lightning_unlearn.objectives.base import UnlearningObjective


class GradAscent(UnlearningObjective):
    """Maximise the NLL of the forget answers; no retain term."""

    def __init__(self, *args, retain_weight: float = 0.0, **kwargs) -> None:
        super().__init__(*args, retain_weight=retain_weight, **kwargs)

    def forget_loss(self, batch: dict) -> Tensor:
        return -self.nll(self.logits(batch["forget"]), batch["forget"]["labels"])


class GradDiff(GradAscent):
    """Gradient ascent on forget plus NLL (or KL to the reference) on retain.

    Args:
        retain_loss_type: ``nll`` (open-unlearning's GradDiff default) or ``kl``
            (KL(reference || model) on the retain answers).
    """

    def __init__(self, *args, retain_weight: float = 1.0, retain_loss_type: str = "nll", **kwargs) -> None:
        if retain_loss_type not in ("nll", "kl"):
            raise UserError(f"retain_loss_type must be 'nll' or 'kl', got {retain_loss_type!r}")
        super().__init__(*args, retain_weight=retain_weight, **kwargs)
        self.retain_loss_type = retain_loss_type
        self.uses_reference = retain_loss_type == "kl"

    def retain_loss(self, batch: dict) -> Tensor:
        if self.retain_loss_type == "nll":
            return super().retain_loss(batch)
        return self.reference_kl(batch["retain"])
