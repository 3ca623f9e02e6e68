"""Token-reweighted gradient ascent: WGA and SatImp, as open-unlearning defines them.

Both scale each forget token's NLL by a detached function of its probability p_t, so that
gradient ascent concentrates on the tokens that matter and stops pushing on ones already forgotten:

- WGA (Wang et al., 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go
  Beyond", ICLR 2025): weight p_t^beta.
- SatImp (Yang et al., 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning",
  ICML 2025): weight p_t^beta1 * (1 - p_t)^beta2 (saturation times importance).

Defaults are open-unlearning's trainer configs (``configs/trainer/WGA.yaml``,
``configs/trainer/SatImp.yaml``; losses in ``src/trainer/unlearn/wga.py``, ``satimp.py``). The
retain term is GradDiff's: NLL (their default) or KL to the reference (their ``KL``).
"""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import label_mask, satimp_loss, wga_loss
from lightning_unlearn.objectives.grad_ascent import GradDiff


class WGA(GradDiff):
    """Weighted gradient ascent on forget plus NLL (or KL) on retain.

    Args:
        beta: exponent of the token weight p_t^beta (open-unlearning: 1.0; gamma 1.0, alpha 1.0).
    """

    def __init__(self, *args, beta: float = 1.0, **kwargs) -> None:
        if beta < 0:
            raise UserError(f"WGA: beta must be non-negative, got {beta}")
        super().__init__(*args, **kwargs)
        self.beta = beta

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        count = self.token_count(label_mask(forget["labels"]))
        return wga_loss(self.logits(forget), forget["labels"], self.beta, num_tokens=count)


class SatImp(GradDiff):
    """SatImp-weighted gradient ascent on forget plus NLL (or KL) on retain.

    Args:
        beta1: saturation exponent, weight p_t^beta1 (open-unlearning: 5.0).
        beta2: importance exponent, weight (1 - p_t)^beta2 (open-unlearning: 1.0).
        forget_weight: gamma (open-unlearning's SatImp.yaml: 0.1, with alpha 1.0; the
            Python class's own defaults, gamma 1.0 and alpha 0.1, are overridden by that config).
    """

    def __init__(
        self, *args, beta1: float = 5.0, beta2: float = 1.0, forget_weight: float = 0.1, **kwargs
    ) -> None:
        if beta1 < 0 or beta2 < 0:
            raise UserError(f"SatImp: beta1 and beta2 must be non-negative, got {beta1} and {beta2}")
        super().__init__(*args, forget_weight=forget_weight, **kwargs)
        self.beta1, self.beta2 = beta1, beta2

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        count = self.token_count(label_mask(forget["labels"]))
        return satimp_loss(self.logits(forget), forget["labels"], self.beta1, self.beta2, num_tokens=count)
