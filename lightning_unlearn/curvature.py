"""Layer-wise curvature statistics of ``nn.Linear`` layers, read off forward and backward hooks.

The block-diagonal inverse-HVPs (``kfac``, ``ekfac``, ``datainf``) never form a Hessian-vector
product: all they need from the model is, for every adapted linear layer s = W a, its input a and
the gradient g = dloss/ds of its output, token by token. A LoRA adapter is two such layers per
adapted module (peft's ``lora_A`` and ``lora_B``, both bias-free ``nn.Linear``), so the statistics
are collected per LoRA factor. One ordinary forward and backward per batch gives them (any
attention kernel works, unlike the double-backward HVPs). The gradient of the weight is
sum_t g_t a_t^T, so the per-example gradient of a layer is the same sum over one row's tokens.

Which g: the Gauss-Newton matrix G = (1/n) sum_i J_i^T H_i J_i (H_i the Hessian of l_i in the
logits) is E[g g^T]-shaped when g is the gradient of a "probe" loss whose outer products average
to H_i. Two probes: ``mc`` samples each answer token from the model's own predictive distribution
and takes the NLL of the samples (for softmax cross-entropy E[r r^T] = diag(p) - p p^T = H_i, so
this is the true Fisher, an unbiased estimate of G; Martens & Grosse 2015, section 5), and
``empirical`` uses the training labels (the empirical Fisher: cheaper, deterministic, biased;
Kunstner et al. 2019 on when that matters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import mean_token_nll

PROBES = ("mc", "empirical")

# (layer name, input a [B, T, in], output gradient g [B, T, out]); padding positions are zero.
OnGrad = Callable[[str, Tensor, Tensor], None]
# (layer name, input a [B, T, in], mask [B, T]) once per forward.
OnInput = Callable[[str, Tensor, Tensor], None]
Probes = Callable[[nn.Module, dict], Iterable[Tensor]]


class CurvatureError(UserError, ValueError):
    """The model or the setting does not fit a layer-wise curvature solver; the message says why."""


def linear_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` module owning each trainable parameter named in ``names`` (its weight).

    Every parameter must be the weight of a bias-free linear layer (a LoRA factor); anything else
    (a bias, DoRA's magnitude, an embedding LoRA) is refused, naming it."""
    modules = dict(model.named_modules())
    layers = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf != "weight" or not isinstance(module, nn.Linear):
            raise CurvatureError(
                f"trainable parameter '{name}' is not the weight of an nn.Linear layer; the K-FAC and "
                "DataInf solvers handle LoRA factors (lora_A / lora_B) only: use method 'cg'"
            )
        if module.bias is not None and module.bias.requires_grad:
            raise CurvatureError(
                f"layer '{owner}' has a trainable bias; the layer-wise solvers handle weights only"
            )
        layers[name] = module
    return layers


class LinearCapture:
    """Hooks on named linear layers: ``on_input`` sees each layer's input once per forward and
    ``on_grad`` its output gradient on every backward, both with padding positions zeroed (call
    ``set_mask`` with the batch's attention mask before the forward). Use as a context manager."""

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        on_grad: OnGrad | None = None,
        on_input: OnInput | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.layers, self.on_grad, self.on_input, self.dtype = layers, on_grad, on_input, dtype
        self.mask: Tensor | None = None
        self.handles: list = []

    def set_mask(self, mask: Tensor | None) -> None:
        self.mask = mask

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            a = inputs[0].detach().to(self.dtype)
            a = a.reshape(a.shape[0], -1, a.shape[-1])  # [B, in] (no sequence) is one token per row
            mask = self.mask
            if mask is None:
                mask = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
            mask = mask.to(device=a.device, dtype=a.dtype).reshape(a.shape[:2])
            a = a * mask[..., None]
            if self.on_input is not None:
                self.on_input(name, a, mask)
            if self.on_grad is not None and output.requires_grad:
                shape = output.shape

                def grad_hook(g: Tensor) -> None:
                    g = g.detach().to(self.dtype).reshape(shape[0], -1, shape[-1]) * mask[..., None]
                    self.on_grad(name, a, g)

                output.register_hook(grad_hook)

        return forward_hook

    def __enter__(self) -> LinearCapture:
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def empirical_probe(model: nn.Module, batch: dict) -> Iterator[Tensor]:
    """The training loss sum_i l_i of the batch: its gradients give the empirical Fisher."""
    from lightning_unlearn.influence import per_example_loss

    yield per_example_loss(model, batch).sum()


def mc_probe(samples: int = 1, seed: int = 0) -> Probes:
    """sum_i l_i with every answer token replaced by a draw from the model's predictive
    distribution at that position, ``samples`` draws (one forward), each scaled by 1/sqrt(samples)
    so that the outer products of their gradients average rather than add up. The draws are seeded
    (the same on every run)."""
    if samples < 1:
        raise CurvatureError(f"mc_samples must be at least 1, got {samples}")
    generator: dict[str, torch.Generator] = {}

    def probes(model: nn.Module, batch: dict) -> Iterator[Tensor]:
        device = next(model.parameters()).device
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        labels = batch["labels"].to(device)
        if str(device) not in generator:
            generator[str(device)] = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            probs = torch.softmax(logits[:, :-1].float(), dim=-1)
        answer = labels[:, 1:] != -100
        for _ in range(samples):
            draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator[str(device)])
            sampled = labels.clone()
            sampled[:, 1:] = torch.where(answer, draws.view(answer.shape), labels[:, 1:])
            yield mean_token_nll(logits, sampled).sum() / samples**0.5

    return probes


def make_probes(fisher: str, mc_samples: int = 1, seed: int = 0) -> Probes:
    if fisher == "mc":
        return mc_probe(mc_samples, seed)
    if fisher == "empirical":
        return empirical_probe
    raise CurvatureError(f"fisher must be one of {', '.join(PROBES)}, got {fisher!r}")


def run_pass(
    model: nn.Module,
    capture: LinearCapture,
    batches: Iterable[dict],
    probes: Probes,
    weights: list[Tensor],
    max_batches: int | None = None,
) -> int:
    """One pass over ``batches`` (at most ``max_batches``): forward, then a backward for each probe
    loss, the hooks of ``capture`` doing the bookkeeping. Returns the number of rows seen."""
    rows = 0
    with capture, torch.enable_grad():
        for k, batch in enumerate(batches):
            if max_batches is not None and k >= max_batches:
                break
            capture.set_mask(batch.get("attention_mask"))
            for loss in probes(model, batch):
                if loss.requires_grad:
                    torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
            rows += int(batch["input_ids"].shape[0])
    return rows
