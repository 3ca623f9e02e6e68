"""Maximum entropy (ME, ME+GD) from "A Closer Look at Machine Unlearning for LLMs" (Yuan et al., ICLR 2025).

Untargeted unlearning that pushes the forget answers' next-token distributions towards uniform,
so the model behaves like one never trained on them, rather than unboundedly raising their loss.
"""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import max_entropy_loss, max_entropy_positions
from lightning_unlearn.objectives.base import UnlearningObjective


class MaxEntropy(UnlearningObjective):
    """KL(uniform || p) on forget positions plus NLL on retain (set ``retain_weight: 0`` for plain ME).

    Args:
        positions: ``answer`` (label tokens) or ``sequence`` (every non-padding position, as
            closer-look's TOFU runs).
    """

    def __init__(self, *args, forget_weight: float = 0.1, positions: str = "answer", **kwargs) -> None:
        if positions not in ("answer", "sequence"):
            raise UserError(f"positions must be 'answer' or 'sequence', got {positions!r}")
        super().__init__(*args, forget_weight=forget_weight, **kwargs)
        self.positions = positions

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        labels, attention = forget["labels"], forget["attention_mask"]
        count = self.token_count(max_entropy_positions(labels, attention, self.positions))
        return max_entropy_loss(self.logits(forget), labels, attention, self.positions, num_tokens=count)
