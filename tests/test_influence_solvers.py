"""The cheap inverse-HVPs where each must be exact: K-FAC and EK-FAC on one example of one linear
layer against the dense Gauss-Newton solve, LiSSA against linalg.solve on a convex quadratic, and
the settings they refuse. (DataInf's Sherman-Morrison check and the cosines against ``exact`` on a
tiny LoRA live in tests/test_influence.py, next to the fitted model they share.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_unlearn.curvature import CurvatureError, linear_layers
from lightning_unlearn.influence import InfluenceError, influence_delta, solve
from lightning_unlearn.kfac import eigenbases, kronecker_factors, refit_eigenvalues


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def test_kfac_on_one_example_of_one_linear_layer_is_the_exact_gauss_newton_solve():
    # Loss l(W) = 1/2 (W x - y)^T M (W x - y) on one example x (one token): its Gauss-Newton matrix
    # J^T M J (J = ds/dvec W) is exactly M (x) x x^T, the Kronecker product K-FAC builds from
    # A = x x^T and S = E[g g^T] = M, when the probe gradients g are the columns of a square root
    # of M (the probes (L^T s)_k with M = L L^T). So (G + lambda I)^-1 b must come out exactly.
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, damping = 5, 3, 0.1
    layer = nn.Linear(d_in, d_out, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=gen, dtype=torch.float64))
    x = torch.randn(1, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(1, d_out, generator=gen, dtype=torch.float64)
    root = torch.randn(d_out, d_out, generator=gen, dtype=torch.float64)
    metric = root @ root.T + 0.5 * torch.eye(d_out, dtype=torch.float64)
    chol = torch.linalg.cholesky(metric)

    def probes(model, batch):
        s = model(batch["input_ids"])[0]
        for k in range(d_out):
            yield chol[:, k] @ s

    # The reference, independently: J by autograd, the loss's Hessian in s by autograd, G = J^T H J.
    def outputs(w):
        return torch.func.functional_call(layer, {"weight": w.view(d_out, d_in)}, (x,))[0]

    jac = torch.autograd.functional.jacobian(outputs, layer.weight.detach().reshape(-1))
    s0 = layer(x)[0].detach()
    hess = torch.autograd.functional.hessian(lambda s: 0.5 * (s - y[0]) @ metric @ (s - y[0]), s0)
    ggn = jac.T @ hess @ jac
    b = torch.randn(d_out * d_in, generator=gen, dtype=torch.float64)
    want = torch.linalg.solve(ggn + damping * torch.eye(d_out * d_in, dtype=torch.float64), b)

    layers = linear_layers(layer, ["weight"])
    batches = [{"input_ids": x}]
    bases = eigenbases(kronecker_factors(layer, layers, batches, probes, _identity, torch.float64))
    kfac = bases["weight"].solve(b.view(d_out, d_in), damping).reshape(-1)
    refit_eigenvalues(layer, layers, bases, batches, probes, _identity, torch.float64)
    ekfac = bases["weight"].solve(b.view(d_out, d_in), damping).reshape(-1)
    print(f"\none linear layer: K-FAC vs dense GGN solve {((kfac - want).norm() / want.norm()).item():.1e}, "
          f"EK-FAC {((ekfac - want).norm() / want.norm()).item():.1e}")  # fmt: skip
    torch.testing.assert_close(kfac, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ekfac, want, rtol=1e-10, atol=1e-12)
    # And the structure is not trivial: the damped GGN is far from a multiple of the identity.
    assert (want - b / (ggn.trace() / ggn.shape[0] + damping)).norm() > 0.5 * want.norm()


def _convex(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    matrix = m @ m.T / 30 + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=gen, dtype=torch.float64)
    parts = [3 * m[:, k::3] @ m[:, k::3].T / 30 + 0.1 * torch.eye(30, dtype=torch.float64) for k in range(3)]
    return matrix, b, parts


def test_lissa_converges_to_exact_on_a_convex_quadratic():
    matrix, b, parts = _convex()
    torch.testing.assert_close(sum(parts) / 3, matrix)
    damping = 0.05
    want = solve(lambda v: matrix @ v, b, damping, "exact").v
    torch.testing.assert_close(
        want, torch.linalg.solve(matrix + damping * torch.eye(30, dtype=torch.float64), b)
    )

    # Full HVPs: Richardson iteration, converging to the solution (rate 1 - lambda_min / scale).
    steps = []
    full = solve(lambda v: matrix @ v, b, damping, "lissa", max_iter=3000, tol=1e-13,
                 on_step=lambda i, r: steps.append(r))  # fmt: skip
    print(f"\nlissa, full HVPs: {full.iterations} steps, residual {full.relative_residual:.1e}")
    assert full.relative_residual < 1e-9 and full.iterations == len(steps) < 3000
    torch.testing.assert_close(full.v, want, rtol=1e-8, atol=1e-8)

    # Mini-batch HVPs (three PSD parts averaging to the matrix): noisy, averaged over repeats.
    cosines = {}
    for repeats in (1, 8):
        noisy = solve(lambda v: matrix @ v, b, damping, "lissa", batch_hvps=[lambda v, a=a: a @ v for a in parts],
                      max_iter=1000, repeats=repeats, seed=1)  # fmt: skip
        cosines[repeats] = torch.nn.functional.cosine_similarity(noisy.v, want, dim=0).item()
    print(f"lissa, 3 mini-batches: cosine with exact {cosines}")
    assert cosines[8] > 0.97 and cosines[8] > cosines[1]


def test_lissa_with_too_small_a_scale_diverges_with_a_clear_error():
    matrix, b, _ = _convex()
    with pytest.raises(InfluenceError, match="lissa diverged"):
        solve(lambda v: matrix @ v, b, 0.05, "lissa", scale=0.1, max_iter=2000)


def test_layerwise_solvers_refuse_what_they_cannot_handle():
    model = nn.Sequential(nn.Linear(3, 2))  # a trainable bias
    with pytest.raises(CurvatureError, match=r"'0.bias' is not the weight of an nn.Linear"):
        linear_layers(model, ["0.bias"])
    with pytest.raises(CurvatureError, match="layer '0' has a trainable bias"):
        linear_layers(model, ["0.weight"])
    model[0].bias.requires_grad_(False)
    assert linear_layers(model, ["0.weight"]) == {"0.weight": model[0]}
    with pytest.raises(InfluenceError, match="must be > 0"):
        influence_delta(model, [], None, 1, 0.0, "kfac")
    with pytest.raises(InfluenceError, match="unknown option.*fisher"):
        influence_delta(model, [], None, 1, 0.1, "datainf", fisher="mc")
    with pytest.raises(InfluenceError, match="layer-wise"):
        solve(lambda v: v, torch.ones(2), 0.1, "kfac")
