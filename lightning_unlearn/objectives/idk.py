"""Objectives that teach the model to refuse: answer the forget questions with "I don't know".

Yuan et al., 2024, "A Closer Look at Machine Unlearning for Large Language Models": IdkNLL trains
the refusals directly; IDK+AP adds answer preservation on retain questions so refusals do not
spread to them; IdkDPO prefers the refusal over the original answer against the reference.
Each needs the data module's ``refusals`` (``forget_idk`` and, for AP, ``retain_idk`` sub-batches).
"""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.losses import answer_preservation_loss, dpo_loss, sequence_logprob
from lightning_unlearn.objectives.base import UnlearningObjective


class IdkNLL(UnlearningObjective):
    """NLL of a refusal on each forget question, plus NLL on retain."""

    needs_refusals = True
    forget_inputs = ("forget_idk",)

    def forget_loss(self, batch: dict) -> Tensor:
        idk = self.sub_batch(batch, "forget_idk")
        return self.nll(self.logits(idk), idk["labels"])


class IdkAP(IdkNLL):
    """IDK+AP: NLL of refusals on forget, plus answer preservation on retain (closer-look's TOFU
    setting: both weights 1, beta 0.1). AP = -(1/beta) mean logsigmoid(beta * (log p(answer) -
    log p(refusal))) on retain questions: it needs no reference model, and it replaces the retain
    NLL rather than adding to it, as in closer-look's ``IDK+AP``."""

    retain_inputs = ("retain", "retain_idk")

    def __init__(self, *args, beta: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta

    def retain_loss(self, batch: dict) -> Tensor:
        retain, idk = batch["retain"], self.sub_batch(batch, "retain_idk")
        answer = sequence_logprob(self.logits(retain), retain["labels"])
        refusal = sequence_logprob(self.logits(idk), idk["labels"])
        return answer_preservation_loss(answer, refusal, self.beta)


class IdkDPO(UnlearningObjective):
    """DPO with the refusal as the chosen answer and the original as the rejected one, plus NLL on
    retain (beta 0.1). Its reference enters only as sequence log-probs, so it is cached by default."""

    uses_reference = True
    needs_refusals = True
    cacheable = ("forget", "forget_idk")
    forget_inputs = ("forget", "forget_idk")

    def __init__(self, *args, beta: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta

    def forget_loss(self, batch: dict) -> Tensor:
        forget, idk = batch["forget"], self.sub_batch(batch, "forget_idk")
        chosen = sequence_logprob(self.logits(idk), idk["labels"])
        rejected = sequence_logprob(self.logits(forget), forget["labels"])
        return dpo_loss(
            chosen,
            rejected,
            self.reference_logprob("forget_idk", idk),
            self.reference_logprob("forget", forget),
            self.beta,
        )
