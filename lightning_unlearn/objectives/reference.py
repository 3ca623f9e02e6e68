"""Reference policies: how an objective sees the model as it was before unlearning.

The reference is the fine-tuned target itself. Three ways to have it, chosen by name
(``reference:`` on every objective):

- ``adapter_off`` (``AdapterOffReference``): the same weights with the LoRA adapter disabled; no
  extra memory, one extra forward per use.
- ``copy`` (``CopyReference``): a frozen copy of the model taken before the adapter is attached
  (full fine-tuning); one model of memory, one extra forward per use.
- ``cached`` (``CachedReference``): for objectives that use the reference only through sequence
  log-probs of fixed sub-batches (NPO, IdkDPO), those log-probs computed once before training,
  each rank computing a shard, and looked up by row index afterwards; no extra memory and no
  extra forward per step. The table is checkpointed, so a resumed run never recomputes it from
  weights that have moved.

Each is an ``nn.Module`` child of the objective (so a copy moves with it to the device) that reads
the objective's model and its way of computing logits (``UnlearningObjective.logits_of``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_unlearn.errors import UserError
from lightning_unlearn.logits import DenseLogits, Logits, decoder_and_head
from lightning_unlearn.losses import sequence_logprob
from lightning_unlearn.sharding import fully_shard_model

if TYPE_CHECKING:
    from lightning_unlearn.objectives.base import UnlearningObjective


class Reference(nn.Module):
    """The frozen model before unlearning, as a policy provides it (see the module docstring)."""

    name = ""

    def setup(self, model: nn.Module) -> None:
        """Called with the loaded target before any adapter is attached."""

    def shard(self, mesh) -> None:
        """Shard what the reference holds like the model (FSDP2 over ``mesh``)."""

    @contextmanager
    def frozen(self, objective: UnlearningObjective) -> Iterator[nn.Module]:
        """The model to run as the reference (for what is not logits: RMU's hidden states)."""
        raise RuntimeError(f"{type(objective).__name__}: the '{self.name}' reference has no model to run")
        yield  # pragma: no cover

    def logits(self, objective: UnlearningObjective, sub_batch: dict[str, Tensor]) -> Logits:
        """The reference's logits on ``sub_batch``."""
        with self.frozen(objective) as model:
            return objective.logits_of(model, sub_batch)

    def logprob(self, objective: UnlearningObjective, name: str, sub_batch: dict[str, Tensor]) -> Tensor:
        """Sequence log-probs ``[B]`` of sub-batch ``name`` under the reference."""
        return sequence_logprob(self.logits(objective, sub_batch), sub_batch["labels"])

    def prepare(self, objective: UnlearningObjective) -> None:
        """Before fit, validate or test: whatever must exist before the first step."""

    def state(self) -> dict[str, Tensor]:
        """What a checkpoint keeps (``reference_cache``); nothing unless cached."""
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore ``state`` from a checkpoint."""


class AdapterOffReference(Reference):
    """The model with its LoRA adapter disabled: the target's own weights."""

    name = "adapter_off"

    @contextmanager
    def frozen(self, objective: UnlearningObjective) -> Iterator[nn.Module]:
        with objective.model.disable_adapter():
            yield objective.model

    def logits(self, objective: UnlearningObjective, sub_batch: dict[str, Tensor]) -> Logits:
        with self.frozen(objective) as model:
            head = decoder_and_head(model)[1]
            if head is not None and any("lora_" in name for name, _ in head.named_parameters()):
                return DenseLogits(objective(sub_batch))  # an adapted head must run with its adapter off
            return objective.logits_of(model, sub_batch)


class CopyReference(Reference):
    """A frozen deep copy of the target, taken before the adapter is attached."""

    name = "copy"

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def shard(self, mesh) -> None:
        if self.model is not None:
            fully_shard_model(self.model, mesh)

    @contextmanager
    def frozen(self, objective: UnlearningObjective) -> Iterator[nn.Module]:
        if self.model is None:
            raise RuntimeError(f"{type(objective).__name__}: the copied reference was never set up")
        yield self.model


class CachedReference(Reference):
    """Sequence log-probs of the objective's ``cacheable`` sub-batches, computed once, by row index."""

    name = "cached"

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[str, Tensor] = {}

    def logprob(self, objective: UnlearningObjective, name: str, sub_batch: dict[str, Tensor]) -> Tensor:
        if name not in self.cache:
            raise RuntimeError(f"no cached reference for '{name}': call build_reference_cache first")
        return self.cache[name].to(sub_batch["index"].device)[sub_batch["index"]]

    def prepare(self, objective: UnlearningObjective) -> None:
        if self.cache:
            return
        datamodule = getattr(objective.trainer, "datamodule", None)
        if not hasattr(datamodule, "reference_loader"):
            raise UserError(
                "reference 'cached' needs an UnlearningDataModule (it precomputes over the forget data)"
            )
        self.build(objective, datamodule)

    @torch.no_grad()
    def build(self, objective: UnlearningObjective, datamodule) -> None:
        """Each rank scores its contiguous shard of every cacheable sub-batch with the frozen
        model; a sum over ranks of (values, counts) gives every rank the whole table."""
        trainer, model, device = objective._trainer, objective.model, objective.device
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        was_training = model.training
        model.eval()
        try:
            for name in objective.cacheable:
                size = len(getattr(datamodule.dataset, name) or [])
                values = torch.zeros(size, dtype=torch.float64, device=device)
                counts = torch.zeros(size, dtype=torch.float64, device=device)
                for sub in datamodule.reference_loader(name, rank, world):
                    sub = {k: v.to(device) for k, v in sub.items()}
                    # The training step's autocast, so a cached value equals what a step would compute.
                    precision = trainer.precision_plugin.forward_context() if trainer else nullcontext()
                    # Fit has not updated the weights yet, so without an adapter they are the target.
                    adapter_off = model.disable_adapter() if objective.adapter_spec else nullcontext()
                    with precision, adapter_off:
                        logp = sequence_logprob(objective.logits(sub), sub["labels"]).double()
                    values.index_add_(0, sub["index"], logp)
                    counts.index_add_(0, sub["index"], torch.ones_like(logp))
                if trainer is not None and world > 1:
                    values = trainer.strategy.reduce(values, reduce_op="sum")
                    counts = trainer.strategy.reduce(counts, reduce_op="sum")
                self.cache[name] = (values / counts).float()
        finally:
            model.train(was_training)

    def state(self) -> dict[str, Tensor]:
        return {k: v.cpu() for k, v in self.cache.items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.cache = dict(state)


REFERENCES: dict[str, type[Reference]] = {
    cls.name: cls for cls in (AdapterOffReference, CachedReference, CopyReference)
}
