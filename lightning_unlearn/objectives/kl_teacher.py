"""EUL's selective teacher-student objective (Chen & Yang, 2023, "Unlearn What You Want to Forget:
Efficient Unlearning for LLMs").

The teacher is the model before unlearning. The student stays close to it on retain data and is
pushed away from it on forget data:

    L = kl_weight * KL_retain - KL_forget + nll_weight * NLL_retain - lm_weight * NLL_forget

with KL = KL(teacher || student) per answer token, and EUL's alpha = 0.8, lambda = 1.0 and
gamma = 0.2 as ``kl_weight``, ``nll_weight`` and ``lm_weight``. The forget terms form
``forget_loss`` and the retain terms ``retain_loss`` (both base weights default to 1).
"""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.errors import UserError
from lightning_unlearn.objectives.base import UnlearningObjective

SCHEDULES = ("joint", "alternating")


class KLTeacher(UnlearningObjective):
    """Args:
    kl_weight: EUL's alpha, the weight of the retain KL.
    nll_weight: EUL's lambda, the weight of the retain task (NLL) loss.
    lm_weight: EUL's gamma, the weight of the (maximised) language-modelling loss on forget.
    schedule: ``joint`` (every step trains both terms) or ``alternating`` (EUL's epoch-wise
        schedule: epochs 0, 2, ... train the forget terms, epochs 1, 3, ... the retain terms, so
        an even number of epochs ends on a retain epoch).
    """

    uses_reference = True

    def __init__(
        self,
        *args,
        kl_weight: float = 0.8,
        nll_weight: float = 1.0,
        lm_weight: float = 0.2,
        schedule: str = "joint",
        **kwargs,
    ) -> None:
        if schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        super().__init__(*args, **kwargs)
        self.kl_weight, self.nll_weight, self.lm_weight = kl_weight, nll_weight, lm_weight
        self.schedule = schedule

    def active_terms(self, stage: str) -> tuple[bool, bool]:
        if self.schedule == "joint" or stage != "train":
            return True, True
        forget_epoch = self.current_epoch % 2 == 0
        return forget_epoch, not forget_epoch

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        logits = self.logits(forget)
        return -self.reference_kl(forget, logits) - self.lm_weight * self.nll(logits, forget["labels"])

    def retain_loss(self, batch: dict) -> Tensor:
        retain = batch["retain"]
        logits = self.logits(retain)
        kl = self.reference_kl(retain, logits)
        return self.kl_weight * kl + self.nll_weight * self.nll(logits, retain["labels"])
