"""DataInf's closed-form inverse-HVP per LoRA factor (Kwon et al., ICLR 2024, "DataInf: Efficiently
Estimating Data Influence in LoRA-tuned LLMs and Diffusion Models", eqs. 5-6).

Per layer l (here: per LoRA factor), the curvature is the damped empirical Fisher of the per-example
gradients g_i = grad_l l_i, and DataInf swaps the inverse and the average:

    ((1/n) sum_i g_i g_i^T + lambda I)^-1  ~=  (1/n) sum_i (g_i g_i^T + lambda I)^-1,

each term inverted by Sherman-Morrison, (g g^T + lambda I)^-1 = (1/lambda) (I - g g^T / (lambda + g^T g)):

    v_l = (1/lambda) (b_l - (1/n) sum_i c_i g_i),    c_i = (g_i . b_l) / (lambda + ||g_i||^2).

The swap is exact for one example and its error grows with the layer's width relative to n (the
paper's Theorem 1 bounds it by O(d_l^2)); LoRA factors are narrow, which is DataInf's case. One pass,
no Kronecker factors, memory of one per-example gradient per row of a batch: the cheapest solver
here. b is needed before the pass (the c_i are dot products with it), which the influence step has.
Under DDP the sums over rows are partial per rank and ``reduce`` adds them up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from lightning_unlearn.curvature import LinearCapture, empirical_probe, run_pass

Reduce = Callable[[Tensor], Tensor]


def datainf_solve(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[dict],
    b: dict[str, Tensor],
    damping: float,
    reduce: Reduce,
    dtype: torch.dtype,
    max_batches: int | None = None,
) -> dict[str, Tensor]:
    """v_l for every layer of ``layers`` (keyed like ``b``, whose tensors are shaped like the weights)."""
    sums = {name: torch.zeros_like(vec, dtype=dtype) for name, vec in b.items()}

    def on_grad(name: str, a: Tensor, g: Tensor) -> None:
        per_example = torch.einsum("bto,bti->boi", g, a)  # g_i of each row, [B, out, in]
        dots = (per_example * b[name]).sum((1, 2))
        coef = dots / (damping + per_example.pow(2).sum((1, 2)))
        sums[name] += torch.einsum("b,boi->oi", coef, per_example)

    capture = LinearCapture(layers, on_grad=on_grad, dtype=dtype)
    rows = run_pass(
        model, capture, batches, empirical_probe, [m.weight for m in layers.values()], max_batches
    )
    names = list(b)
    device = b[names[0]].device
    flat = reduce(
        torch.cat(
            [*(sums[n].reshape(-1) for n in names), torch.tensor([float(rows)], dtype=dtype, device=device)]
        )
    )
    n_rows = flat[-1].clamp_min(1)
    pieces = torch.split(flat[:-1], [sums[n].numel() for n in names])
    return {
        name: (b[name] - piece.view_as(b[name]) / n_rows) / damping
        for name, piece in zip(names, pieces, strict=True)
    }
