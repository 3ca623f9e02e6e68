"""K-FAC and EK-FAC inverse-HVPs, one Kronecker-factored block per LoRA factor.

For a linear layer s = W a (W: out x in) the Gauss-Newton block of L = (1/n) sum_i l_i is
approximated as a Kronecker product (Martens & Grosse 2015, "Optimizing Neural Networks with
Kronecker-factored Approximate Curvature"; with tokens as in Eschenhagen et al. 2023, "K-FAC for
modern architectures", the "expand" case):

    G_W ~= S (x) A,    A = (1/N) sum_{i,t} a a^T  (N: the unpadded tokens),
                       S = (1/n) sum_{i,t} g g^T  (g: the output gradient of a probe loss of l_i),

so that vec(DW)^T G_W vec(DW) = tr(DW^T S DW A) with W flattened row-major. With the
eigendecompositions A = Q_A diag(l_A) Q_A^T and S = Q_S diag(l_S) Q_S^T the damped block inverts
exactly:

    (S (x) A + lambda I)^-1 vec(V) = vec(Q_S [(Q_S^T V Q_A) / (l_S l_A^T + lambda)] Q_A^T)

(elementwise division). EK-FAC (George et al. 2018, "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis") keeps the eigenbasis and replaces l_S l_A^T by the second moment of
the per-example gradients in it, (1/n) sum_i (Q_S^T DW_i Q_A)^2, which is the best diagonal in that
basis and costs a second pass. For one example with one token, S (x) A is that example's Gauss-Newton
block exactly, and so is EK-FAC's.

Cost per LoRA factor: the A factor is in x in and S is out x out, so lora_A (r x d_in) holds a
d_in^2 and an r^2 matrix and lora_B (d_out x r) an r^2 and a d_out^2 one; one eigendecomposition of
each. Blocks are independent: cross-layer curvature is dropped (the approximation), and the result
is not the Newton step on H but on a positive semi-definite Gauss-Newton surrogate of it.

Distributed: the factor sums (and EK-FAC's second moments) are partial sums over each rank's rows,
added up by ``reduce`` as the HVPs are; the eigendecompositions then run on identical matrices on
every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_unlearn.curvature import LinearCapture, Probes, run_pass

Reduce = Callable[[Tensor], Tensor]


@dataclass
class Eigenbasis:
    """One layer's curvature block in its Kronecker eigenbasis: Q_A [in, in], Q_S [out, out] and the
    eigenvalues of the block, ``scale`` [out, in] (l_S l_A^T for K-FAC, refitted for EK-FAC)."""

    q_a: Tensor
    q_s: Tensor
    scale: Tensor

    def solve(self, v: Tensor, damping: float) -> Tensor:
        """(block + damping I)^-1 v for v shaped like the weight [out, in]."""
        rotated = self.q_s.T @ v @ self.q_a
        return self.q_s @ (rotated / (self.scale + damping)) @ self.q_a.T


def _reduce_all(tensors: list[Tensor], reduce: Reduce) -> list[Tensor]:
    # One collective for everything: flatten, reduce, cut back.
    flat = reduce(torch.cat([t.reshape(-1) for t in tensors]))
    return [
        chunk.view_as(t)
        for chunk, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors, strict=True)
    ]


def kronecker_factors(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[dict],
    probes: Probes,
    reduce: Reduce,
    dtype: torch.dtype,
    max_batches: int | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """(A, S) of every layer from one pass over ``batches`` (the first ``max_batches`` of them, a
    subsample, if given), normalised by the tokens and rows seen over all ranks."""
    sums_a = {
        name: torch.zeros(m.in_features, m.in_features, dtype=dtype, device=m.weight.device)
        for name, m in layers.items()
    }
    sums_s = {
        name: torch.zeros(m.out_features, m.out_features, dtype=dtype, device=m.weight.device)
        for name, m in layers.items()
    }
    device = next(iter(layers.values())).weight.device
    tokens = torch.zeros(len(layers), dtype=dtype, device=device)
    index = {name: k for k, name in enumerate(layers)}

    def on_input(name: str, a: Tensor, mask: Tensor) -> None:
        flat = a.reshape(-1, a.shape[-1])
        sums_a[name] += flat.T @ flat
        tokens[index[name]] += mask.sum()

    def on_grad(name: str, a: Tensor, g: Tensor) -> None:
        flat = g.reshape(-1, g.shape[-1])
        sums_s[name] += flat.T @ flat

    capture = LinearCapture(layers, on_grad=on_grad, on_input=on_input, dtype=dtype)
    rows = run_pass(model, capture, batches, probes, [m.weight for m in layers.values()], max_batches)
    rows_t = torch.tensor([float(rows)], dtype=dtype, device=device)
    names = list(layers)
    reduced = _reduce_all([*sums_a.values(), *sums_s.values(), tokens, rows_t], reduce)
    k = len(names)
    tokens, rows_t = reduced[2 * k], reduced[2 * k + 1]
    return {
        name: (reduced[j] / tokens[j].clamp_min(1), reduced[k + j] / rows_t[0].clamp_min(1))
        for j, name in enumerate(names)
    }


def eigenbases(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Eigenbasis]:
    """K-FAC's eigenbasis of every block; eigenvalues clamped at 0 (the factors are PSD, rounding
    is not)."""
    bases = {}
    for name, (a, s) in factors.items():
        l_a, q_a = torch.linalg.eigh((a + a.T) / 2)
        l_s, q_s = torch.linalg.eigh((s + s.T) / 2)
        bases[name] = Eigenbasis(q_a, q_s, torch.outer(l_s.clamp_min(0), l_a.clamp_min(0)))
    return bases


def refit_eigenvalues(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    bases: dict[str, Eigenbasis],
    batches: Iterable[dict],
    probes: Probes,
    reduce: Reduce,
    dtype: torch.dtype,
    max_batches: int | None = None,
) -> None:
    """EK-FAC: replace each block's eigenvalues by (1/n) sum_i (Q_S^T DW_i Q_A)^2 from a second
    pass, DW_i = sum_t g_t a_t^T being example i's gradient of the layer's weight."""
    sums = {name: torch.zeros_like(basis.scale) for name, basis in bases.items()}

    def on_grad(name: str, a: Tensor, g: Tensor) -> None:
        basis = bases[name]
        per_example = torch.einsum("bto,bti->boi", g, a)
        sums[name] += (basis.q_s.T @ per_example @ basis.q_a).pow(2).sum(0)

    capture = LinearCapture(layers, on_grad=on_grad, dtype=dtype)
    rows = run_pass(model, capture, batches, probes, [m.weight for m in layers.values()], max_batches)
    names = list(bases)
    device = bases[names[0]].scale.device
    reduced = _reduce_all([*sums.values(), torch.tensor([float(rows)], dtype=dtype, device=device)], reduce)
    for j, name in enumerate(names):
        bases[name].scale = reduced[j] / reduced[-1][0].clamp_min(1)
