"""UNDIAL (Dong et al., 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning
in Large Language Models", NAACL 2025), as open-unlearning defines it.

Self-distillation: the student (the model being unlearned) is trained towards the frozen teacher's
(the model before unlearning) next-token distribution with the true token's logit lowered by
``beta``. The target is fixed, so the loss cannot run away the way gradient ascent does.

Defaults are open-unlearning's (``configs/trainer/UNDIAL.yaml``, ``src/trainer/unlearn/undial.py``,
``compute_undial_loss`` in ``src/trainer/utils.py``): beta 10, gamma 1, alpha 0 (the paper uses no
retain set), retain type NLL; their config also sets lr 1e-4 and 10 epochs. Where we differ: the
cross-entropy is averaged over the forget *label* tokens only; theirs averages over every position
of the sequence, prompt and padding included (distilling the unchanged teacher there, and at
positions whose label is -100 the index wraps round, so it is vocabulary id V-100 whose logit is lowered).
"""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import label_mask, undial_loss
from lightning_unlearn.objectives.grad_ascent import GradDiff


class UNDIAL(GradDiff):
    """UNDIAL on forget (plus, if ``retain_weight`` > 0, NLL or KL on retain).

    Args:
        beta: how far the true token's teacher logit is lowered (open-unlearning: 10; their README
            suggests searching 3, 10, 30).
        retain_weight: alpha (open-unlearning: 0).
    """

    def __init__(self, *args, beta: float = 10.0, retain_weight: float = 0.0, **kwargs) -> None:
        if beta < 0:
            raise UserError(f"UNDIAL: beta must be non-negative, got {beta}")
        super().__init__(*args, retain_weight=retain_weight, **kwargs)
        self.uses_reference = True  # the teacher, whatever the retain term
        self.beta = beta

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        logits, teacher = self.logits(forget), self.reference_logits(forget)
        count = self.token_count(label_mask(forget["labels"]))
        return undial_loss(logits, teacher, forget["labels"], self.beta, num_tokens=count)
