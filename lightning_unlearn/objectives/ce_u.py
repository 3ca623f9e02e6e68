"""CE-U (Yang et al., 2025, "CE-U: Cross Entropy Unlearning"), as open-unlearning defines it.

The target of each forget position is the model's own next-token distribution with the true token
removed (its logit set to -inf, then detached): the gradient on the logits is p - q, which lowers
the true token by exactly its probability and vanishes once it is forgotten, so unlike gradient
ascent the loss is bounded and does not run away.

Open-unlearning (``src/trainer/unlearn/ceu.py``, ``configs/trainer/CEU.yaml``) trains the forget
term alone and skips the first answer token of each sequence (``ignore_first_n_answer_tokens: 1``,
from a footnote in the paper's training settings); those are our defaults. Where we differ: an
optional NLL retain term (``retain_weight``, 0 by default, so off as in theirs).
"""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import ce_u_loss, drop_first_label_tokens, label_mask
from lightning_unlearn.objectives.base import UnlearningObjective


class CEU(UnlearningObjective):
    """CE-U on forget (plus, if ``retain_weight`` > 0, NLL on retain).

    Args:
        ignore_first_n_answer_tokens: label tokens at the start of each forget answer left out
            of the loss (open-unlearning: 1).
        retain_weight: alpha (open-unlearning: no retain term, so 0).
    """

    def __init__(
        self, *args, ignore_first_n_answer_tokens: int = 1, retain_weight: float = 0.0, **kwargs
    ) -> None:
        if ignore_first_n_answer_tokens < 0:
            raise UserError(
                f"CEU: ignore_first_n_answer_tokens must be non-negative, got {ignore_first_n_answer_tokens}"
            )
        super().__init__(*args, retain_weight=retain_weight, **kwargs)
        self.ignore_first_n_answer_tokens = ignore_first_n_answer_tokens

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        labels = drop_first_label_tokens(forget["labels"], self.ignore_first_n_answer_tokens)
        return ce_u_loss(self.logits(forget), labels, num_tokens=self.token_count(label_mask(labels)))
