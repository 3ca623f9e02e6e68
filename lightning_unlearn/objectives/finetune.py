"""Plain fine-tuning: builds the target and retain models of the TOFU protocol."""

from __future__ import annotations

from torch import Tensor

from lightning_unlearn.objectives.base import UnlearningObjective


class FineTune(UnlearningObjective):
    """Next-token NLL on plain batches of one split (``FineTuneDataModule``)."""

    def step(self, batch: dict, stage: str) -> Tensor:
        loss = self.nll(self.logits(batch), batch["labels"])
        self.log_term(stage, "loss", loss)
        return loss
