"""Unlearning objectives, one LightningModule per family (DESIGN section 4)."""

from lightning_unlearn.objectives.base import UnlearningObjective
from lightning_unlearn.objectives.finetune import FineTune
from lightning_unlearn.objectives.grad_ascent import GradAscent, GradDiff
from lightning_unlearn.objectives.max_entropy import MaxEntropy
from lightning_unlearn.objectives.npo import NPO, SimNPO

__all__ = ["NPO", "FineTune", "GradAscent", "GradDiff", "MaxEntropy", "SimNPO", "UnlearningObjective"]
