"""NPO (Zhang et al., 2024, "Negative Preference Optimization") and SimNPO (Fan et al., 2024).

NPO treats the forget answers as dispreferred against the model before unlearning: its loss is
bounded, so it does not run away the way gradient ascent does. SimNPO drops the reference and
length-normalises, removing the reference model's bias towards short answers.
"""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.losses import mean_token_nll, npo_loss, sequence_logprob, simnpo_loss
from lightning_unlearn.objectives.base import UnlearningObjective


class NPO(UnlearningObjective):
    """NPO on forget plus NLL on retain. Args: beta, the inverse temperature (0.1)."""

    uses_reference = True
    cacheable = ("forget",)

    def __init__(self, *args, beta: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        logp = sequence_logprob(self.logits(forget), forget["labels"])
        return npo_loss(logp, self.reference_logprob("forget", forget), self.beta)


class SimNPO(UnlearningObjective):
    """SimNPO on forget plus NLL on retain (open-unlearning's defaults: beta 4.5, delta 0, gamma 0.125)."""

    def __init__(
        self, *args, beta: float = 4.5, delta: float = 0.0, forget_weight: float = 0.125, **kwargs
    ) -> None:
        super().__init__(*args, forget_weight=forget_weight, **kwargs)
        self.beta, self.delta = beta, delta

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        return simnpo_loss(mean_token_nll(self.logits(forget), forget["labels"]), self.beta, self.delta)
