"""The influence-function step of LLMEraser: edit a fine-tuned adapter without
retraining, by one damped Newton step on the edited training loss.

Training loss of the adapter: L(theta) = (1/n) sum_i l_i(theta), with l_i the mean token NLL of
example i over its answer tokens. Every edit changes L by a few terms, and we solve

    (H + lambda I) v = b,    theta_new = theta_hat + v,

with H the Hessian of L at theta_hat over the trainable (adapter) parameters only, and

* instance removal:  b = (1/n) sum_{z in S} grad l_z;
* query modification / response correction:  b = (1/n) sum_j [grad l(z_j) - grad l(z'_j)], where
  z_j is the old record and z'_j the new one (the two edits differ only in what the records hold).

Sign check. Removing S leaves L'(theta) = L(theta) - (1/n) sum_{z in S} l_z(theta). At a stationary
point theta_hat of L, grad L'(theta_hat) = -(1/n) sum_S grad l_z, and one Newton step on L' (with
H' ~= H) gives theta_new ~= theta_hat + H^-1 (1/n) sum_S grad l_z: v = +(H + lambda I)^-1 b. For a
modification L' = L + (1/n) sum_j [l(z'_j) - l(z_j)], so grad L'(theta_hat) = -(1/n) sum_j [grad
l(z_j) - grad l(z'_j)] and the same step gives the b above. ``tests/test_influence.py`` checks both
signs numerically (loss on removed / old records rises, loss on new records falls).

If the adapter was fine-tuned with an L2 penalty (lambda/2) ||theta||^2, theta_hat is stationary for
the penalised loss and damping = lambda makes v its exact Newton step. Using H (all n examples)
rather than the Hessian of the edited loss is the classical influence approximation: for a large
edit it undershoots (removing 2 of 16 records in the tests: right direction, about half the norm).

LLMEraser's released code minimises a quadratic whose minimiser is 2 H^-1 b; we solve the system
stated in the paper (factor 1).

Non-convexity: an LLM's loss is not convex, so H may be indefinite even at a fine-tuned point. The
damping lambda must make H + lambda I positive definite: ``cg`` stops with NegativeCurvatureError
when it meets a direction p with p^T (H + lambda I) p <= 0, and ``stochastic`` diverges (also
reported). ``exact`` solves the linear system whatever its definiteness.

HVPs are double backward (grad with create_graph=True, then grad of g . v). The fused attention
kernels have no double backward, so the HVPs run SDPA with its math backend (which materialises
the T x T attention); a model on flash_attention_2 cannot be used. Nothing here works under
``torch.inference_mode`` (Lightning's validate/predict loops): call it where autograd is allowed.

Distributed: ``torch.autograd.grad`` never goes through DDP's gradient hooks, so nothing is
synchronised for us. Each rank computes b and every HVP as a partial sum over its own shard
(divided by the global n) and ``reduce`` (``all_reduce_sum`` by default) adds the partial sums up.
After that every vector is the same on every rank, so the solvers run identically everywhere with
local dot products. This assumes every rank holds the whole adapter (DDP; use the unwrapped module
for the forward passes); an FSDP-sharded adapter would have to be gathered first.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_unlearn.curvature import linear_layers, make_probes
from lightning_unlearn.datainf import datainf_solve
from lightning_unlearn.errors import UserError
from lightning_unlearn.kfac import eigenbases, kronecker_factors, refit_eigenvalues
from lightning_unlearn.losses import mean_token_nll
from lightning_unlearn.models import named_trainable

HVP = Callable[[Tensor], Tensor]
Reduce = Callable[[Tensor], Tensor]

# Solvers that only need v -> H v (double-backward HVPs), and layer-wise ones that read per-layer
# statistics off one (two for ekfac) ordinary forward/backward pass and never form an HVP.
HVP_METHODS = ("exact", "cg", "stochastic", "lissa")
LAYERWISE_METHODS = ("kfac", "ekfac", "datainf")
METHODS = HVP_METHODS + LAYERWISE_METHODS
EDIT_KINDS = ("instance_removal", "query_modification", "response_correction")


class InfluenceError(UserError, ValueError):
    """A setting or an edit the influence step cannot work with; the message says which and why."""


class NegativeCurvatureError(InfluenceError):
    """H + damping I is not positive definite along a direction the solver met."""


@dataclass
class SolveResult:
    """The solution ``v`` of (H + damping I) v = b, how many iterations (HVP calls for ``exact``,
    passes over the training data for the layer-wise methods) it took, and its true relative
    residual ||(H + damping I) v - b|| / ||b|| (None where it was not computed: the layer-wise
    methods skip it unless ``residual=True``, since it costs one full HVP)."""

    v: Tensor
    iterations: int
    relative_residual: float | None
    method: str


@dataclass
class Edit:
    """What changes in the training set. ``removed``: batches of the records to drop (instance
    removal). ``old`` / ``new``: batches where row j of ``old[k]`` and ``new[k]`` are the same example
    before and after the edit (query modification changes the question, response correction the
    answer). Under DDP each rank holds its share of the rows (possibly none)."""

    kind: str
    removed: list[dict] | None = None
    old: list[dict] | None = None
    new: list[dict] | None = None

    def __post_init__(self) -> None:
        if self.kind not in EDIT_KINDS:
            raise InfluenceError(f"edit kind must be one of {', '.join(EDIT_KINDS)}, got {self.kind!r}")
        self.removed, self.old, self.new = (
            [x] if isinstance(x, dict) else x for x in (self.removed, self.old, self.new)
        )
        if self.kind == "instance_removal":
            if self.removed is None or self.old is not None or self.new is not None:
                raise InfluenceError(
                    "instance_removal takes 'removed' (batches of records) and no 'old'/'new'"
                )
            return
        if self.old is None or self.new is None or self.removed is not None:
            raise InfluenceError(f"{self.kind} takes 'old' and 'new' (paired batches) and no 'removed'")
        if len(self.old) != len(self.new):
            raise InfluenceError(
                f"{self.kind}: 'old' has {len(self.old)} batches but 'new' has {len(self.new)}; they must pair up"
            )
        for k, (old, new) in enumerate(zip(self.old, self.new, strict=True)):
            rows_old, rows_new = _rows(old), _rows(new)
            if rows_old != rows_new:
                raise InfluenceError(
                    f"{self.kind}: batch {k} has {rows_old} old rows but {rows_new} new rows; "
                    "row j of old and new must be the same example"
                )


def _rows(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


# -- flat vectors ------------------------------------------------------------------------------


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """One flat vector of ``tensors`` in order (the solvers work on flat vectors)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``vec`` cut into tensors shaped (and typed) like ``params``; the inverse of ``flatten``."""
    sizes = [p.numel() for p in params]
    if vec.numel() != sum(sizes):
        raise InfluenceError(f"vector has {vec.numel()} entries but the parameters have {sum(sizes)}")
    return [chunk.view_as(p).to(p.dtype) for chunk, p in zip(torch.split(vec, sizes), params, strict=True)]


def _grads(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    # Zeros where a parameter does not reach the loss, so flat vectors always line up.
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def flat_grad(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """grad of ``loss`` with respect to ``params`` as one flat vector (zeros for unused parameters)."""
    return flatten(_grads(loss, params))


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks when torch.distributed is initialised; ``t`` itself otherwise.
    Returns a new tensor (the input is left alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _identity(t: Tensor) -> Tensor:
    return t


# -- Hessian-vector products -------------------------------------------------------------------


def loss_hvp(loss_fn: Callable[[], Tensor], params: list[Tensor], reduce: Reduce | None = None) -> HVP:
    """v -> H v with H the Hessian of ``loss_fn()`` in ``params``, by double backward:
    g = grad(loss, create_graph=True), then H v = grad(g . v). The forward is recomputed on every
    call (simple, and no graph is held between calls). ``reduce`` is applied to the flat result."""
    reduce = reduce or _identity

    def hvp(v: Tensor) -> Tensor:
        return reduce(_hvp_partial(loss_fn, params, v))

    return hvp


def _hvp_partial(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], v: Tensor) -> Tensor:
    # The fused attention kernels (flash, memory-efficient, CPU flash) have no double backward;
    # the math one is plain differentiable ops (it materialises the T x T attention, though).
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        grads = _grads(loss_fn(), params, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(grads, unflatten(v, params), strict=True))
        return flatten(_grads(dot, params)).to(v.dtype)


def per_example_loss(model: nn.Module, batch: dict) -> Tensor:
    """l_i for each row of ``batch``: the mean token NLL over its answer tokens, ``[B]``."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    return mean_token_nll(logits, batch["labels"].to(device))


def dataset_hvp(
    model: nn.Module,
    batches: Iterable[dict],
    params: list[Tensor],
    n_train: int,
    reduce: Reduce | None = None,
) -> HVP:
    """v -> H v with H the Hessian of L = (1/n_train) sum_i l_i over every row of ``batches``
    (re-iterable: a list or a DataLoader), accumulated one batch at a time. Under DDP pass this
    rank's shard and ``reduce=all_reduce_sum``: the partial sums add up to the global one."""
    reduce = reduce or _identity

    def hvp(v: Tensor) -> Tensor:
        total = torch.zeros_like(v)
        for batch in batches:
            total += _hvp_partial(lambda batch=batch: per_example_loss(model, batch).sum(), params, v)
        return reduce(total / n_train)

    return hvp


# -- solvers -----------------------------------------------------------------------------------


def solve(hvp: HVP, b: Tensor, damping: float, method: str = "cg", **options) -> SolveResult:
    """Solve (H + damping I) v = b, given ``hvp`` (v -> H v, without damping) and flat ``b``.

    ``exact``: dense H from ``hvp`` column by column, solved in float64 (small adapters and tests;
    options ``max_dim``). ``cg``: conjugate gradient with full HVPs (options ``tol``, ``max_iter``,
    ``on_step``). ``stochastic``: LLMEraser's finite-sum quadratic with mini-batch HVPs (options
    ``batch_hvps``, ``lr``, ``momentum``, ``max_iter``, ``tol``, ``seed``, ``average``,
    ``power_iters``, ``on_step``). ``lissa``: the LiSSA recursion on mini-batch HVPs (options
    ``batch_hvps``, ``scale``, ``max_iter``, ``repeats``, ``tol``, ``seed``, ``power_iters``,
    ``on_step``). The residual reported is the true one, from one more ``hvp`` call. The
    layer-wise methods (``kfac``, ``ekfac``, ``datainf``) need the model: see ``influence_delta``.
    """
    if method not in HVP_METHODS:
        raise InfluenceError(
            f"solve takes an HVP method ({', '.join(HVP_METHODS)}), got {method!r}; the layer-wise "
            "methods need the model: use influence_delta"
        )
    check_options(method, damping, options)
    solver = _HVP_SOLVERS[method]
    b_norm = b.norm().item()
    if b_norm == 0:
        return SolveResult(torch.zeros_like(b), 0, 0.0, method)
    v, iterations = solver(hvp, b, damping, **options)
    residual = (hvp(v) + damping * v - b).norm().item() / b_norm
    return SolveResult(v, iterations, residual, method)


def check_options(method: str, damping: float, options: dict) -> None:
    """Refuse an unknown method, a damping it cannot use, or an option it does not take, naming it."""
    if method not in METHODS:
        raise InfluenceError(f"influence method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in LAYERWISE_METHODS and not damping > 0:
        raise InfluenceError(f"method {method!r} divides by the damping: it must be > 0, got {damping}")
    if not damping >= 0:
        raise InfluenceError(f"damping must be >= 0, got {damping}")
    signature = _HVP_SOLVERS.get(method) or _LAYERWISE_OPTIONS[method]
    skip = ("hvp", "b", "damping")
    allowed = [name for name in inspect.signature(signature).parameters if name not in skip]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InfluenceError(
            f"unknown option(s) {', '.join(unknown)} for method {method!r}; it takes {', '.join(allowed)}"
        )


def _solve_exact(hvp: HVP, b: Tensor, damping: float, max_dim: int = 20000) -> tuple[Tensor, int]:
    n = b.numel()
    if n > max_dim:
        raise InfluenceError(
            f"exact influence solve builds a dense {n}x{n} Hessian, above max_dim={max_dim}; "
            "use method 'cg' or 'stochastic', or raise max_dim"
        )
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    hessian = torch.stack([hvp(eye[i]) for i in range(n)], dim=1).double()
    hessian = (hessian + hessian.T) / 2  # double backward is symmetric only up to rounding
    system = hessian + damping * torch.eye(n, dtype=torch.float64, device=b.device)
    return torch.linalg.solve(system, b.double()).to(b.dtype), n


def _curvature_error(what: str, damping: float) -> NegativeCurvatureError:
    return NegativeCurvatureError(
        f"{what} with damping={damping}: H + damping I is not positive definite along a direction "
        "(the loss is not convex there, or it is flat: a LoRA with r >= 2 fitted with an L2 "
        "penalty equal to damping is flat along the rotations A -> R A, B -> B R^T, which leave "
        "B A and the penalty unchanged); increase damping above the fit's weight decay"
    )


def _solve_cg(
    hvp: HVP,
    b: Tensor,
    damping: float,
    tol: float = 1e-6,
    max_iter: int = 100,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Tensor, int]:
    # Plain CG from v = 0 on A = H + damping I; stops once ||r|| <= tol ||b||.
    b_norm = b.norm()
    v = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    iteration = 0
    for iteration in range(1, max_iter + 1):
        ap = hvp(p) + damping * p
        curvature = p @ ap
        if curvature <= 0:
            raise _curvature_error(
                f"conjugate gradient met negative curvature p^T A p = {curvature.item():.3g} "
                f"at iteration {iteration}",
                damping,
            )
        alpha = rs / curvature
        v += alpha * p
        r -= alpha * ap
        rs_new = r @ r
        relative = (rs_new.sqrt() / b_norm).item()
        if on_step is not None:
            on_step(iteration, relative)
        if relative <= tol:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return v, iteration


def largest_eigenvalue(hvp: HVP, like: Tensor, iterations: int = 20, seed: int = 0) -> float:
    """|largest eigenvalue| of the symmetric operator ``hvp``, by power iteration from a seeded
    random start (the same on every rank). Power iteration approaches it from below."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
    x /= x.norm()
    estimate = 0.0
    for _ in range(iterations):
        y = hvp(x)
        estimate = (x @ y).abs().item()
        y_norm = y.norm()
        if y_norm == 0:
            return 0.0
        x = y / y_norm
    return estimate


def _solve_stochastic(
    hvp: HVP,
    b: Tensor,
    damping: float,
    batch_hvps: Sequence[HVP] | None = None,
    lr: float | None = None,
    momentum: float = 0.9,
    max_iter: int = 1000,
    tol: float = 0.0,
    seed: int = 0,
    average: bool = True,
    power_iters: int = 20,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Tensor, int]:
    # Heavy-ball SGD on q(v) = 1/2 v^T (H + damping I) v - b^T v, whose gradient on mini-batch i is
    # g = H_i v + damping v - b; the H_i average to H, so g is unbiased. Heavy ball's long-run step
    # is lr / (1 - momentum), so the default lr = (1 - momentum) / L (L: largest eigenvalue of
    # H + damping I, by power iteration on the full hvp) keeps it at the 1/L of plain gradient
    # descent: mini-batch Hessians are sharper than H (and can be indefinite where H + damping I is
    # not), and with lr = 1/L and momentum 0.9 the solve diverged on a tiny LoRA in our tests.
    # With ``average`` the iterates of the second half are averaged (Polyak-Ruppert), which removes
    # most of the noise that constant-step SGD keeps around the solution. ``tol`` is compared with a
    # running mean of the mini-batch relative residual; that has a noise floor ||(H_i - H) v*|| /
    # ||b||, so the default 0 runs all ``max_iter`` iterations. The default lr costs ``power_iters``
    # full HVPs (pass ``lr`` to skip them).
    batch_hvps = list(batch_hvps) if batch_hvps is not None else [hvp]
    if not batch_hvps:
        raise InfluenceError("stochastic influence solve needs at least one mini-batch HVP")
    if not 0 <= momentum < 1:
        raise InfluenceError(f"momentum must be in [0, 1), got {momentum}")
    if lr is None:
        top = largest_eigenvalue(lambda x: hvp(x) + damping * x, b, power_iters, seed)
        if top == 0:
            raise InfluenceError("H + damping I is zero; nothing to solve (set damping > 0)")
        lr = (1.0 - momentum) / top
    generator = torch.Generator().manual_seed(seed)
    b_norm = b.norm().item()
    v = torch.zeros_like(b)
    velocity = torch.zeros_like(b)
    tail_start = max_iter // 2
    mean_v, n_mean = torch.zeros_like(b), 0
    running = None
    iteration = 0
    for iteration in range(1, max_iter + 1):
        i = int(torch.randint(len(batch_hvps), (1,), generator=generator))
        g = batch_hvps[i](v) + damping * v - b
        relative = g.norm().item() / b_norm
        if not math.isfinite(relative) or relative > 1e8:
            raise _curvature_error(
                f"stochastic solve diverged at iteration {iteration} (lr={lr:.3g})", damping
            )
        velocity = momentum * velocity - lr * g
        v = v + velocity
        if average and iteration > tail_start:
            n_mean += 1
            mean_v += (v - mean_v) / n_mean
        running = relative if running is None else 0.9 * running + 0.1 * relative
        if on_step is not None:
            on_step(iteration, relative)
        if running <= tol:
            break
    return (mean_v if n_mean > 0 else v), iteration


def _solve_lissa(
    hvp: HVP,
    b: Tensor,
    damping: float,
    batch_hvps: Sequence[HVP] | None = None,
    scale: float | None = None,
    max_iter: int = 1000,
    repeats: int = 1,
    tol: float = 0.0,
    seed: int = 0,
    power_iters: int = 20,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Tensor, int]:
    # LiSSA (Agarwal, Bullins & Hazan 2017, "Second-Order Stochastic Optimization for Machine
    # Learning in Linear Time", Algorithm 1; for influence functions, Koh & Liang 2017): with
    # A = H + damping I and scale s above A's largest eigenvalue, A^-1 = (1/s) sum_j (I - A/s)^j,
    # and the truncated series is the recursion u_0 = b, u_j = b + u_{j-1} - A_j u_{j-1} / s with
    # A_j = H_j + damping I on a random mini-batch (unbiased for A); v = u_J / s. With the full hvp
    # it is Richardson iteration and converges to A^-1 b at rate 1 - lambda_min(A)/s; mini-batches
    # leave noise, which ``repeats`` independent recursions average down. The default scale is
    # 1.2x the largest eigenvalue of A by power iteration (``power_iters`` full HVPs): mini-batch
    # Hessians are sharper than H. ``tol`` stops a recursion once ||u_j - u_{j-1}|| <= tol ||u_j||.
    batch_hvps = list(batch_hvps) if batch_hvps is not None else [hvp]
    if not batch_hvps:
        raise InfluenceError("lissa needs at least one mini-batch HVP")
    if repeats < 1 or max_iter < 1:
        raise InfluenceError(f"lissa needs repeats >= 1 and max_iter >= 1, got {repeats} and {max_iter}")
    if scale is None:
        top = largest_eigenvalue(lambda x: hvp(x) + damping * x, b, power_iters, seed)
        if top == 0:
            raise InfluenceError("H + damping I is zero; nothing to solve (set damping > 0)")
        scale = 1.2 * top
    if not scale > 0:
        raise InfluenceError(f"lissa scale must be > 0, got {scale}")
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(b)
    step = 0
    for _ in range(repeats):
        u = b.clone()
        for _ in range(max_iter):
            step += 1
            i = int(torch.randint(len(batch_hvps), (1,), generator=generator))
            update = b - (batch_hvps[i](u) + damping * u) / scale
            relative = (update.norm() / u.norm().clamp_min(1e-30)).item()
            u = u + update
            if not math.isfinite(relative) or u.norm().item() > 1e8 * b.norm().item():
                raise _curvature_error(f"lissa diverged at step {step} (scale={scale:.3g})", damping)
            if on_step is not None:
                on_step(step, relative)
            if relative <= tol:
                break
        total += u / scale
    return total / repeats, step


_HVP_SOLVERS = {
    "exact": _solve_exact,
    "cg": _solve_cg,
    "stochastic": _solve_stochastic,
    "lissa": _solve_lissa,
}


# -- layer-wise solvers (K-FAC, EK-FAC, DataInf) -----------------------------------------------


def _kfac_options(
    fisher: str = "mc",
    mc_samples: int = 1,
    seed: int = 0,
    max_batches: int | None = None,
    residual: bool = False,
) -> None:
    """Options of ``kfac`` and ``ekfac``: ``fisher`` ``mc`` (labels sampled from the model: the
    Gauss-Newton matrix in expectation) or ``empirical`` (the training labels), ``mc_samples`` draws
    per batch, ``seed`` of the draws, ``max_batches`` (fit the factors on the first batches only),
    ``residual`` (also compute the true residual: one full HVP)."""


def _datainf_options(max_batches: int | None = None, residual: bool = False) -> None:
    """Options of ``datainf``: ``max_batches`` (average over the first batches only) and
    ``residual`` (also compute the true residual: one full HVP)."""


_LAYERWISE_OPTIONS = {"kfac": _kfac_options, "ekfac": _kfac_options, "datainf": _datainf_options}


def _solve_layerwise(
    model: nn.Module,
    train_batches: Iterable[dict],
    named: list[tuple[str, Tensor]],
    b: Tensor,
    n_train: int,
    damping: float,
    method: str,
    reduce: Reduce,
    fisher: str = "mc",
    mc_samples: int = 1,
    seed: int = 0,
    max_batches: int | None = None,
    residual: bool = False,
) -> SolveResult:
    names, params = [n for n, _ in named], [p for _, p in named]
    layers = linear_layers(model, names)
    if b.norm().item() == 0:
        return SolveResult(torch.zeros_like(b), 0, 0.0, method)
    b_pieces = {
        n: piece.view_as(p)
        for n, piece, p in zip(names, torch.split(b, [p.numel() for p in params]), params, strict=True)
    }
    if method == "datainf":
        pieces = datainf_solve(model, layers, train_batches, b_pieces, damping, reduce, b.dtype, max_batches)
        passes = 1
    else:
        probes = make_probes(fisher, mc_samples, seed)
        bases = eigenbases(
            kronecker_factors(model, layers, train_batches, probes, reduce, b.dtype, max_batches)
        )
        passes = 1
        if method == "ekfac":
            refit_eigenvalues(model, layers, bases, train_batches, probes, reduce, b.dtype, max_batches)
            passes = 2
        pieces = {n: bases[n].solve(b_pieces[n], damping) for n in names}
    v = flatten(pieces[n] for n in names)
    relative = None
    if residual:
        hvp = dataset_hvp(model, train_batches, params, n_train, reduce)
        relative = ((hvp(v) + damping * v - b).norm() / b.norm()).item()
    return SolveResult(v, passes, relative, method)


# -- the model-level step ----------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, parameter) of everything with requires_grad (the LoRA adapter of a peft model)."""
    named = named_trainable(model)
    if not named:
        raise InfluenceError("the model has no trainable parameters (requires_grad=True) to edit")
    return named


def _edit_gradient(
    model: nn.Module, edit: Edit, params: list[Tensor], n_train: int, dtype: torch.dtype
) -> Tensor:
    # This rank's part of b; sums over rows, so shards add up.
    total = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
    with torch.enable_grad():
        if edit.kind == "instance_removal":
            for batch in edit.removed:
                total += flat_grad(per_example_loss(model, batch).sum(), params).to(dtype)
        else:
            for old, new in zip(edit.old, edit.new, strict=True):
                loss = per_example_loss(model, old).sum() - per_example_loss(model, new).sum()
                total += flat_grad(loss, params).to(dtype)
    return total / n_train


def influence_delta(
    model: nn.Module,
    train_batches: Iterable[dict],
    edit: Edit,
    n_train: int,
    damping: float,
    method: str = "cg",
    reduce: Reduce | None = None,
    **options,
) -> tuple[dict[str, Tensor], SolveResult]:
    """v = (H + damping I)^-1 b for ``edit`` over the trainable parameters of ``model``, keyed by
    their names in ``model.named_parameters()``, and the SolveResult; add it with ``apply_delta``.

    ``train_batches`` (re-iterable) covers the training set of size ``n_train`` (this rank's shard
    under DDP). ``reduce`` sums partial results over ranks (default ``all_reduce_sum``, the identity
    when torch.distributed is not initialised). For ``stochastic`` the mini-batch HVPs default to one
    per train batch, scaled by len(batches) / n_train so that their average is H; under DDP every rank
    must then hold the same number of batches (ranks draw the same index, and the reduced HVP is that
    batch summed over ranks); ``lissa`` likewise. ``kfac``, ``ekfac`` and ``datainf`` solve
    block-diagonally per LoRA factor from one (ekfac: two) plain forward/backward pass over
    ``train_batches`` (modules ``kfac``, ``datainf``); their partial sums are reduced the same way. The model is put in eval mode meanwhile (no dropout: the Hessian of a
    deterministic loss).
    """
    if n_train < 1:
        raise InfluenceError(f"n_train must be at least 1, got {n_train}")
    check_options(method, damping, options)
    reduce = reduce or all_reduce_sum
    named = trainable_parameters(model)
    params = [p for _, p in named]
    was_training = model.training
    model.eval()
    try:
        # Work in at least float32 whatever the adapter's dtype.
        work = torch.promote_types(params[0].dtype, torch.float32)
        b = reduce(_edit_gradient(model, edit, params, n_train, work))
        if method in LAYERWISE_METHODS:
            result = _solve_layerwise(
                model, train_batches, named, b, n_train, damping, method, reduce, **options
            )
            pieces = unflatten(result.v, params)
            return {name: piece.detach() for (name, _), piece in zip(named, pieces, strict=True)}, result
        if method in ("stochastic", "lissa") and options.get("batch_hvps") is None:
            train_batches = list(train_batches)
            scale = len(train_batches) / n_train
            options["batch_hvps"] = [
                loss_hvp(lambda batch=batch: scale * per_example_loss(model, batch).sum(), params, reduce)
                for batch in train_batches
            ]
        hvp = dataset_hvp(model, train_batches, params, n_train, reduce)
        result = solve(hvp, b, damping, method, **options)
    finally:
        model.train(was_training)
    pieces = unflatten(result.v, params)
    return {name: piece.detach() for (name, _), piece in zip(named, pieces, strict=True)}, result


def apply_delta(model: nn.Module, v: dict[str, Tensor], alpha: float = 1.0) -> None:
    """Add ``alpha * v`` in place to the parameters of ``model`` named in ``v`` (alpha=-1 undoes it)."""
    params = dict(model.named_parameters())
    missing = sorted(set(v) - set(params))
    if missing:
        raise InfluenceError(f"delta names parameters the model does not have: {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, delta in v.items():
            params[name].add_(delta.to(device=params[name].device, dtype=params[name].dtype), alpha=alpha)
