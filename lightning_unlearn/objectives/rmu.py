"""RMU, representation misdirection for unlearning (Li et al., 2024, "The WMDP Benchmark: Measuring
and Reducing Malicious Use With Unlearning"), as open-unlearning defines it.

Forget: the updated model's hidden state at the output of decoder layer ``layer``, at each forget
label token, is driven towards ``steering_coeff * u``, u a fixed random unit vector, which scrambles
everything downstream. Retain (open-unlearning's ``EMBED_DIFF``): the same layer's hidden states on
retain label tokens are held at those of the model before unlearning. Both are MSEs averaged over the
hidden dimension, over each sequence's label tokens, then over the batch (``representation_loss``).

Defaults are open-unlearning's ``configs/trainer/RMU.yaml`` (code ``src/trainer/unlearn/rmu.py``):
layer 7 (their ``module_regex: model\\.layers\\.7``), steering_coeff 2, gamma 1, alpha 1, retain
``EMBED_DIFF``, every parameter trainable. The layer is model-specific (their config says to tune
it, with the steering coefficient and alpha, per model and data set): 7 is kept as the default, so
set it for your model (``layer`` must be below its number of decoder layers). An earlier version of
their config used steering 300 and alpha 1000 and, like the WMDP code it borrows from, trained only
layers 5-7's ``mlp.down_proj``; to restrict what trains here, use the adapter's ``target_modules``.

Where we differ, and why:
- u is drawn once from a generator seeded by ``seed`` (uniform in [0, 1)^D then normalised, the
  same distribution as theirs) and kept as a buffer, so it is reproducible, saved in checkpoints
  and identical on every rank; theirs draws it from the global RNG at the first step.
- With the ``embed_diff`` retain term nothing after ``layer`` receives a gradient, so those
  parameters (later decoder layers, the final norm, an untied output head) are frozen: the same
  updates as theirs (an optimiser skips parameters without a gradient), but DDP does not fail on
  unused parameters and the optimiser holds no state for them.
- A sequence without label tokens adds 0 to the batch mean where theirs gives NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_unlearn.architecture import base_model, decoder_layers
from lightning_unlearn.errors import UserError
from lightning_unlearn.logits import decoder_and_head
from lightning_unlearn.losses import representation_loss
from lightning_unlearn.objectives.base import UnlearningObjective

RETAIN_LOSS_TYPES = ("embed_diff", "nll")


class RMU(UnlearningObjective):
    """Steer forget activations at one layer to a random vector; keep retain activations in place.

    Args:
        layer: index (from 0) of the decoder layer whose output is steered (open-unlearning: 7).
        steering_coeff: norm of the target activation, c in c * u (open-unlearning: 2).
        retain_loss_type: ``embed_diff`` (MSE to the frozen model's activations at ``layer``,
            open-unlearning's default) or ``nll``.
        seed: seed of the random direction u.
    """

    forget_inputs = ()  # the forget term reads a layer's hidden states, not logits

    def __init__(
        self,
        *args,
        layer: int = 7,
        steering_coeff: float = 2.0,
        retain_loss_type: str = "embed_diff",
        seed: int = 0,
        **kwargs,
    ) -> None:
        if retain_loss_type not in RETAIN_LOSS_TYPES:
            raise UserError(
                f"RMU: retain_loss_type must be one of {', '.join(RETAIN_LOSS_TYPES)}, got {retain_loss_type!r}"
            )
        if layer < 0:
            raise UserError(f"RMU: layer must be a non-negative decoder layer index, got {layer}")
        if steering_coeff <= 0:
            raise UserError(f"RMU: steering_coeff must be positive, got {steering_coeff}")
        super().__init__(*args, **kwargs)
        self.layer, self.steering_coeff = layer, steering_coeff
        self.retain_loss_type, self.seed = retain_loss_type, seed
        self.uses_reference = retain_loss_type == "embed_diff"
        self.register_buffer("steering_vector", None)  # u, drawn in configure_model (needs the width)

    def configure_model(self) -> None:
        super().configure_model()
        layers = decoder_layers(self.model)
        if self.layer >= len(layers):
            raise UserError(
                f"RMU: layer {self.layer} is out of range: the model has {len(layers)} decoder layers "
                f"(0 to {len(layers) - 1})"
            )
        if self.steering_vector is None:
            generator = torch.Generator().manual_seed(self.seed)
            u = torch.rand(self._hidden_size(), generator=generator, device="cpu")
            self.steering_vector = u / u.norm()
        if self.retain_loss_type == "embed_diff":
            self._freeze_after_layer(layers)

    def _hidden_size(self) -> int:
        config = base_model(self.model).config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return config.hidden_size

    def _freeze_after_layer(self, layers: nn.ModuleList) -> None:
        base = base_model(self.model)
        downstream = list(layers[self.layer + 1 :])
        decoder = base.get_decoder() if callable(getattr(base, "get_decoder", None)) else None
        for name in ("norm", "final_layer_norm", "ln_f"):
            if isinstance(getattr(decoder, name, None), nn.Module):
                downstream.append(getattr(decoder, name))
        head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
        if head is not None and (embeddings is None or head.weight is not embeddings.weight):
            downstream.append(head)
        for module in downstream:
            module.requires_grad_(False)

    def layer_output(self, sub_batch: dict[str, Tensor], model: nn.Module | None = None) -> Tensor:
        """Hidden states ``[B, T, D]`` at the output of decoder layer ``layer`` of ``model``
        (default: the model being unlearned), captured by a forward hook."""
        model = self.model if model is None else model
        captured: list[Tensor] = []

        def hook(module, args, output):
            if not captured:  # the first call's output
                captured.append(output[0] if isinstance(output, tuple) else output)

        handle = decoder_layers(model)[self.layer].register_forward_hook(hook)
        body = decoder_and_head(model)[0] or model  # no output layer: its logits are never read
        try:
            body(
                input_ids=sub_batch["input_ids"], attention_mask=sub_batch["attention_mask"], use_cache=False
            )
        finally:
            handle.remove()
        return captured[0]

    @torch.no_grad()
    def reference_layer_output(self, sub_batch: dict[str, Tensor]) -> Tensor:
        """``layer_output`` of the model as it was before unlearning (see ``reference_logits``): the
        frozen copy, or the same weights with the adapter disabled."""
        with self._reference.frozen(self) as model:
            return self.layer_output(sub_batch, model)

    def forget_loss(self, batch: dict) -> Tensor:
        forget = batch["forget"]
        hidden = self.layer_output(forget)
        target = self.steering_coeff * self.steering_vector.to(hidden.device)
        return representation_loss(hidden, target, forget["labels"] != -100)

    def retain_loss(self, batch: dict) -> Tensor:
        retain = batch["retain"]
        if self.retain_loss_type == "nll":
            return self.nll(self.logits(retain), retain["labels"])
        return representation_loss(
            self.layer_output(retain), self.reference_layer_output(retain), retain["labels"] != -100
        )
