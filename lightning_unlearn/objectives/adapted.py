"""AdaptedModel: a LightningModule that holds a model (optionally with a LoRA adapter) and
exports it; what every unlearning objective and the influence step share.

It owns what does not depend on how the model is trained: where the model comes from
(``model_spec``), which parameters train (``trainable``), what a checkpoint keeps (only those:
the frozen tensors are the spec's and ``configure_model`` rebuilds them), and the export of the
model, gathered from FSDP2 shards when it is sharded. Training (losses, references, optimiser,
the non-finite guard) is ``UnlearningObjective``'s; a linear solve is ``InfluenceStep``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import LightningModule
from torch import Tensor

from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.export import export_model
from lightning_unlearn.models import (
    LoraSpec,
    ModelSpec,
    attach_lora,
    load_model,
    load_spec_tokenizer,
    named_trainable,
)
from lightning_unlearn.sharding import full_state_dict, is_sharded


class AdaptedModel(LightningModule):
    """A model loaded in ``configure_model`` (so sharding strategies can wrap it), its trainable
    parameters, checkpoints of those alone, and ``export``.

    Args:
        model: where the model comes from; may be set after construction (``model_spec``, as the
            protocol does), but must be set before ``configure_model``.
        adapter: the LoRA a subclass attaches, if any (export then writes or merges an adapter).
    """

    def __init__(self, model: ModelSpec | None = None, adapter: LoraSpec | None = None) -> None:
        super().__init__()
        self.model_spec, self.adapter_spec = model, adapter
        self.model: torch.nn.Module | None = None

    def forward(self, sub_batch: dict[str, Tensor]) -> Tensor:
        """Full ``[B, T, V]`` logits (an objective's losses read ``UnlearningObjective.logits``,
        which never builds them)."""
        return self.model(input_ids=sub_batch["input_ids"], attention_mask=sub_batch["attention_mask"]).logits

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of what training changes (``models.named_trainable``)."""
        return named_trainable(self)

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def strict_loading(self) -> bool:
        # A checkpoint holds the trainable tensors only (on_save_checkpoint); on_load_checkpoint
        # checks that every one of them is there.
        return False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen tensors (a LoRA's base, a copied reference, InfluenceStep's base) are the
        # model_spec's, rebuilt by configure_model: keep only what training changes, so an
        # epoch's checkpoint of a LoRA run is megabytes, not the whole model.
        trainable = {name for name, _ in self.trainable()}
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint:  # a sharded checkpoint: the strategy loaded the weights itself
            return
        trainable = {name for name, _ in self.trainable()}
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if missing:
            raise UserError(
                f"the checkpoint does not hold this objective's trainable weights ({len(missing)} missing, "
                f"e.g. '{missing[0]}'): it was written by another model or adapter configuration"
            )

    # -- export -------------------------------------------------------------------------------
    def gathered_state(self) -> dict[str, Tensor]:
        """The trained tensors of the FSDP2-sharded model as full CPU tensors (a collective: every
        rank calls it). With an adapter only the LoRA tensors travel; the base is the spec's own."""
        keep = (lambda name: "lora_" in name) if self.adapter_spec is not None else None
        return full_state_dict(self.model, keep)

    def model_from_state(self, state: dict[str, Tensor]) -> torch.nn.Module:
        """A plain (unsharded) model: ``model_spec``'s, with its adapter, holding ``state``."""
        model = load_model(self.model_spec)
        if self.adapter_spec is not None:
            model = attach_lora(model, self.adapter_spec)
        missing, unexpected = model.load_state_dict(state, strict=self.adapter_spec is None)
        if unexpected or any("lora_" in name for name in missing):
            raise RuntimeError(f"gathered state does not fit the model: {unexpected or missing}")
        return model

    def export(self, directory: str | Path, merge: bool = True, tokenizer: str | None = None) -> Path:
        """Save the model and its tokenizer in one atomic step (``lightning_unlearn.export``):
        merged full weights, or the peft adapter alone. ``tokenizer`` defaults to the model's own.
        Every rank must call it (a sharded model is gathered first); only global rank 0 writes."""
        state = self.gathered_state() if is_sharded(self.model) else None
        if self._trainer is not None and not self.trainer.is_global_zero:
            return Path(directory)
        model = self.model if state is None else self.model_from_state(state)
        tok = load_tokenizer(tokenizer) if tokenizer else load_spec_tokenizer(self.model_spec)
        # A model rebuilt from gathered shards is this call's own: merge it in place.
        return export_model(directory, model, tok, merge, self.export_files(), in_place=state is not None)

    def export_files(self) -> dict[str, str]:
        """Extra text files ``export`` writes beside the model (name -> content); none here."""
        return {}
