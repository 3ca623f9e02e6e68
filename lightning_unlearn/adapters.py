"""Fuse per-request LoRA adapters into one (EUL, Chen & Yang 2023; RegMean, Jin et al. 2023).

Every function works on ``Factors``: module name -> (B with its LoRA scaling folded in, A), so the
delta of a linear layer y = W x is exactly ``B @ A`` whatever r, lora_alpha or rsLoRA each request
used. Module names are peft module paths as in a saved adapter's state-dict keys before
``.lora_A.weight`` (``base_model.model.model.layers.0.self_attn.q_proj``); Gram matrices use the
same keys. Solves run in float64; results are cast back to the adapters' dtype.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_unlearn.errors import UserError, brief
from lightning_unlearn.io import atomic_directory
from lightning_unlearn.safe_load import load_tensors, refusal

Factors = dict[str, tuple[Tensor, Tensor]]

PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
DEFAULT_RIDGE = 1e-4
# peft's own merge types (``PeftModel.add_weighted_adapter``); linear/ties/dare_*/magnitude_prune
# combine the A and B factors separately and so need every adapter to have the same r.
PEFT_METHODS = (
    "linear",
    "ties",
    "cat",
    "svd",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = tuple(m for m in PEFT_METHODS if m not in ("linear", "cat", "svd"))


def delta(factors: Factors, name: str) -> Tensor:
    """The dense weight delta ``B @ A`` [out, in] of one module (for checks and small layers)."""
    b, a = factors[name]
    return b @ a


def max_rank(factors: Factors) -> int:
    """The largest LoRA rank over modules (what a saved adapter's ``r`` must be)."""
    return max((a.shape[0] for _, a in factors.values()), default=0)


def lora_factors(model: nn.Module, adapter: str | None = None, scaling: float | None = None) -> Factors:
    """Factors of ``adapter`` (default: the active one) of a live peft model.

    ``scaling`` overrides each layer's own scaling (``add_weighted_adapter`` results are meant to
    have scaling 1; see ``peft_fusion``).
    """
    if adapter is None:
        active = getattr(model, "active_adapter", None)
        if not isinstance(active, str):
            raise UserError(f"lora_factors: name the adapter to read (active adapters: {active!r})")
        adapter = active
    factors: Factors = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if not isinstance(layer, LoraLinear):
            raise UserError(f"fusion supports LoRA on linear layers only; '{name}' is {type(layer).__name__}")
        if layer.use_dora.get(adapter, False) or layer.lora_bias.get(adapter, False):
            raise UserError(
                f"'{name}': DoRA / lora_bias adapters are not a plain B @ A delta and cannot be fused"
            )
        s = layer.scaling[adapter] if scaling is None else scaling
        a = layer.lora_A[adapter].weight.detach()
        b = layer.lora_B[adapter].weight.detach()
        factors[name] = ((b * s).clone(), a.clone())
    if not factors:
        raise UserError(f"the model has no LoRA layers for adapter '{adapter}'")
    return factors


def load_factors(directory: str | Path) -> Factors:
    """Factors of a saved peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"not a saved peft adapter: '{path}' is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"'{config_path}' is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise UserError(f"'{config_path}' has no numeric 'lora_alpha': not a LoRA adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"'{directory}': only LoRA adapters can be fused, got {config.get('peft_type')}")
    if config.get("use_dora") or config.get("lora_bias"):
        raise UserError(f"'{directory}': DoRA / lora_bias adapters are not a plain B @ A delta")
    state = load_tensors(weights_path)
    extra = [k for k in state if not k.endswith((A_SUFFIX, B_SUFFIX))]
    if extra:
        raise UserError(f"'{directory}': cannot fuse non-LoRA tensors such as '{extra[0]}'")
    alpha, alpha_pattern = config["lora_alpha"], config.get("alpha_pattern") or {}
    factors: Factors = {}
    for key in sorted(k for k in state if k.endswith(A_SUFFIX)):
        name = key[: -len(A_SUFFIX)]
        a, b = state[key], state.get(name + B_SUFFIX)
        if b is None:
            raise UserError(f"'{directory}': '{name}' has lora_A but no lora_B")
        r = a.shape[0]  # the actual rank, so rank_pattern needs no lookup
        module_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), _relative(name)), alpha)
        scale = module_alpha / math.sqrt(r) if config.get("use_rslora") else module_alpha / r
        factors[name] = (b * scale, a)
    return factors


GRAMS_FORMAT = "lightning_unlearn.grams/2"
# The one safetensors metadata key of a Gram file. One key, because safetensors writes its metadata
# map in hash order, which changes from one save to the next: two keys would make two identical
# runs write different bytes.
GRAMS_KEY = "lightning_unlearn.grams"


@dataclass(frozen=True, eq=False)
class Gram:
    """One request's Gram matrix G = X^T X of a layer's inputs X [n, in] (RegMean, Jin et al. 2023,
    "Dataless Knowledge Fusion by Merging Weights of Language Models"), in whichever exact form is
    smaller: a factor F [rows, in] with F^T F = G when rows < in (G has rank at most n, so n tokens
    need only n rows), else G itself. Exactly one of ``factor`` and ``dense`` is set. Modules that
    read the same input hold the same ``Gram`` object, which is stored once and fused once."""

    factor: Tensor | None = None
    dense: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.factor is None) == (self.dense is None):
            raise ValueError("a Gram is either a factor or dense")

    @property
    def in_dim(self) -> int:
        return (self.dense if self.factor is None else self.factor).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return (self.dense if self.factor is None else self.factor).dtype

    def matrix(self) -> Tensor:
        """G [in, in] in float64."""
        if self.dense is not None:
            return self.dense.double()
        f = self.factor.double()
        return f.T @ f


def factor_of_rows(x: Tensor) -> Tensor:
    """The thinnest exact factor of X^T X from the rows X [n, in] (n < in), as R [n', in] from a QR
    decomposition X' = QR: R^T R = X'^T Q^T Q X' = X'^T X'. X' is X with identical rows merged (one
    row times sqrt(count): a prompt prefix shared by every record gives identical hidden states at
    every layer), so n' <= n. R's rows are signed to a non-negative diagonal, which makes R the
    unique such upper-trapezoidal factor of the Gram (when X's leading columns are independent),
    whatever order the rows came in (1 process or gathered from several). Unique is not
    well-conditioned: where X's rows are nearly dependent, rounding-level changes in X move R's
    trailing rows far more than they move R^T R, so compare Grams, never factors. Being
    upper-trapezoidal, R is saved packed in n' in - n'(n'-1)/2 numbers, fewer than the in(in+1)/2
    of a packed dense Gram whenever n' < in. (X itself is exact too but not thinner, and scaled
    eigenvectors of X X^T cost an eigendecomposition and pack no better.) Computed in float64."""
    # c identical rows x contribute c x^T x = (sqrt(c) x)^T (sqrt(c) x): one row does
    unique, counts = torch.unique(x.double(), dim=0, return_counts=True)
    r = torch.linalg.qr(unique * counts.double().sqrt()[:, None], mode="r").R
    sign = torch.where(r.diagonal() < 0, -1.0, 1.0).to(r.dtype)
    return r * sign[:, None]


def pack_triu(m: Tensor) -> Tensor:
    """The upper-triangular (or -trapezoidal) part of ``m`` as a flat vector, row by row."""
    rows, cols = torch.triu_indices(m.shape[0], m.shape[1])
    return m[rows, cols].contiguous()


def unpack_triu(v: Tensor, shape: tuple[int, int], symmetric: bool) -> Tensor:
    """Inverse of ``pack_triu``; ``symmetric`` mirrors it into the lower triangle (a dense Gram)."""
    rows, cols = torch.triu_indices(*shape)
    m = v.new_zeros(shape)
    m[rows, cols] = v
    return m + m.triu(1).T if symmetric else m


def save_grams(path: str | Path, grams: dict[str, Gram]) -> None:
    """Write one request's Grams: one packed tensor per distinct ``Gram`` object (modules sharing
    an input share it), named by the first module that reads it; the header's metadata (one key,
    ``GRAMS_KEY``: JSON with ``format``, ``modules`` and ``entries``) maps every module to its
    tensor and gives each tensor's kind and shape."""
    owners: dict[int, str] = {}
    modules: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    for name, gram in grams.items():
        key = owners.setdefault(id(gram), name)
        modules[name] = key
        if key == name:
            value = gram.dense if gram.factor is None else gram.factor
            kind = "dense" if gram.factor is None else "factor"
            entries[key] = {"kind": kind, "shape": list(value.shape)}
            tensors[key] = pack_triu(value.detach().float().cpu())
    layout = {"format": GRAMS_FORMAT, "modules": modules, "entries": entries}
    save_file(tensors, str(path), metadata={GRAMS_KEY: json.dumps(layout)})


def load_grams(path: str | Path) -> dict[str, Gram]:
    """A request's Grams by module name, from ``save_grams``'s format or the earlier one (one dense
    [in, in] Gram per module name, no metadata). Modules that share a stored tensor share one
    ``Gram`` object, so ``RegMeanSums`` fuses them over one factorisation."""
    tensors = load_tensors(path)
    metadata = _safetensors_metadata(path)
    if GRAMS_KEY not in metadata:
        for name, g in tensors.items():
            if g.ndim != 2 or g.shape[0] != g.shape[1]:
                raise UserError(f"'{path}': Gram '{name}' is {tuple(g.shape)}, not square")
        return {name: Gram(dense=g) for name, g in tensors.items()}
    try:
        layout = json.loads(metadata[GRAMS_KEY])
        if layout["format"] != GRAMS_FORMAT:
            raise ValueError(f"format {layout['format']!r}, not {GRAMS_FORMAT!r}")
        modules, entries = layout["modules"], layout["entries"]
        grams = {key: _unpacked(tensors[key], spec) for key, spec in entries.items()}
        return {name: grams[key] for name, key in modules.items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"'{path}' is not a readable Gram file ({brief(err)})") from None


def _unpacked(packed: Tensor, spec: dict[str, Any]) -> Gram:
    """One stored entry as a ``Gram``, its declared shape checked against the packed tensor's size
    before anything is allocated (the file may come from anywhere)."""
    rows, cols = (int(n) for n in spec["shape"])
    square = spec["kind"] == "dense"
    if spec["kind"] not in ("dense", "factor") or not 0 <= rows <= cols or (square and rows != cols):
        raise ValueError(f"bad entry {spec}")
    if packed.ndim != 1 or packed.numel() != rows * cols - rows * (rows - 1) // 2:
        raise ValueError(f"a packed tensor of {packed.numel()} numbers for {spec}")
    matrix = unpack_triu(packed, (rows, cols), symmetric=square)
    return Gram(dense=matrix) if square else Gram(factor=matrix)


def _safetensors_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise UserError(f"'{path}' is not a readable safetensors file ({err})") from None


@dataclass(frozen=True, eq=False)
class GramSum:
    """sum_k G_k of one module over the requests so far, in float64: the stacked factors
    F = [F_1; F_2; ...] (F^T F = sum_k F_k^T F_k) with their cached inner products K = F F^T while
    F has fewer rows than in_dim, else the dense sum. Immutable: modules that read one input share
    a sum for as long as they were adapted in the same requests."""

    factor: Tensor | None = None
    inner: Tensor | None = None
    dense: Tensor | None = None

    @property
    def in_dim(self) -> int:
        return (self.dense if self.factor is None else self.factor).shape[1]

    def trace(self) -> float:
        return float((self.dense if self.factor is None else self.inner).diagonal().sum())

    def matrix(self) -> Tensor:
        return self.dense if self.factor is None else self.factor.T @ self.factor


def gram_sum_plus(total: GramSum | None, gram: Gram, matrix: Tensor) -> GramSum:
    """``total`` + G (``matrix``: G's factor or G in float64). Stays factored while the stacked rows
    stay under in_dim: there the Woodbury solve (rank m) is cheaper than the dense one (rank in);
    beyond it the sum turns dense, once, and new Grams are added densely."""
    if gram.factor is not None and (total is None or total.factor is not None):
        stacked = matrix if total is None else torch.cat([total.factor, matrix])
        if stacked.shape[0] < stacked.shape[1]:
            if total is None:
                return GramSum(factor=stacked, inner=matrix @ matrix.T)
            cross = matrix @ total.factor.T
            inner = torch.cat(
                [torch.cat([total.inner, cross.T], 1), torch.cat([cross, matrix @ matrix.T], 1)]
            )
            return GramSum(factor=stacked, inner=inner)
    dense = matrix.T @ matrix if gram.factor is not None else matrix
    return GramSum(dense=dense if total is None else total.matrix() + dense)


@dataclass(frozen=True)
class RegMeanTerm:
    """One module of one request: B_k, the projection P_k = A_k G_k [r, in] and, when G_k = F_k^T F_k
    is factored, the coefficients C_k = A_k F_k^T [r, n_k] (P_k = C_k F_k), all but B in float64."""

    b: Tensor
    p: Tensor
    coef: Tensor | None


class RegMeanSums:
    """RegMean's running sums over requests: per module G = sum_k G_k (a ``GramSum``) and, per request,
    B_k and the projection P_k = A_k G_k (r_k x in). That is all the closed form needs, so request
    k+1 adds one Gram and one small projection instead of reloading every earlier request's Grams:
    fusion time stays flat as requests accumulate. Modules given the same ``Gram`` object (one
    input read by q/k/v, say) share one sum and one factorisation. Kept in float64."""

    def __init__(self) -> None:
        self.sums: dict[str, GramSum] = {}
        self.terms: list[dict[str, RegMeanTerm]] = []
        self.eps = 0.0

    def add(self, factors: Factors, grams: dict[str, Tensor | Gram]) -> None:
        """One request: its factors and its Grams (keyed by the same module names; a Tensor is a
        dense Gram)."""
        k = len(self.terms)
        wrapped = {id(g): Gram(dense=g) for g in grams.values() if isinstance(g, Tensor)}
        matrices: dict[int, Tensor] = {}
        new_sums: dict[tuple[int, int], tuple[GramSum | None, GramSum]] = {}
        terms = {}
        for name, (b, a) in factors.items():
            if name not in grams:
                raise UserError(f"regmean: request {k} has an adapter for '{name}' but no Gram matrix")
            gram = wrapped.get(id(grams[name]), grams[name])
            if gram.in_dim != a.shape[1] or (gram.dense is not None and gram.dense.shape[0] != a.shape[1]):
                shape = tuple((gram.dense if gram.factor is None else gram.factor).shape)
                raise UserError(f"regmean: Gram of '{name}' (request {k}) is {shape}, want {a.shape[1]}^2")
            self.eps = max(self.eps, torch.finfo(gram.dtype).eps)
            matrix = matrices.setdefault(id(gram), _float64(gram).to(a.device))
            previous = self.sums.get(name)
            key = (id(previous), id(gram))
            if key not in new_sums:  # holding ``previous`` keeps its id from being reused meanwhile
                new_sums[key] = (previous, gram_sum_plus(previous, gram, matrix))
            self.sums[name] = new_sums[key][1]
            terms[name] = _term(b, a, gram, matrix)
        self.terms.append(terms)

    def fuse(self, ridge: float = DEFAULT_RIDGE) -> tuple[Factors, dict[str, Any]]:
        """M = sum_k delta_k G_k (G + lambda I)^-1 for every module, as an exact LoRA of rank sum_k r_k."""
        if not self.terms:
            raise UserError("regmean: no requests to fuse")
        if ridge < 0:
            raise UserError(f"regmean: ridge must be >= 0, got {ridge}")
        groups: dict[int, list[str]] = {}
        for name, total in self.sums.items():
            groups.setdefault(id(total), []).append(name)
        fused: Factors = {}
        lambdas: dict[str, float] = {}
        solves: dict[str, str] = {}
        for names in groups.values():
            total = self.sums[names[0]]
            lam = ridge * total.trace() / total.in_dim
            present = {name: [t[name] for t in self.terms if name in t] for name in names}
            solved, how = solve_group(total, present, lam, self.eps)
            for name, terms in present.items():
                dtype = terms[0].b.dtype
                fused[name] = (torch.cat([t.b for t in terms], dim=1).to(dtype), solved[name].to(dtype))
                lambdas[name], solves[name] = lam, how
        info = {
            "method": "regmean",
            "ridge": ridge,
            "lambda": {name: lambdas[name] for name in self.sums},
            "solve": {name: solves[name] for name in self.sums},
            "requests": len(self.terms),
        }
        return {name: fused[name] for name in self.sums}, info


def _float64(gram: Gram) -> Tensor:
    return (gram.dense if gram.factor is None else gram.factor).double()


def _term(b: Tensor, a: Tensor, gram: Gram, matrix: Tensor) -> RegMeanTerm:
    """P_k = A_k G_k, via the factor when there is one (2 r n in instead of 2 r in^2 operations)."""
    if gram.factor is None:
        return RegMeanTerm(b, a.double() @ matrix, None)
    coef = a.double() @ matrix.T
    return RegMeanTerm(b, coef @ matrix, coef)


def solve_group(
    total: GramSum, present: dict[str, list[RegMeanTerm]], lam: float, eps: float
) -> tuple[dict[str, Tensor], str]:
    """The fused A of every module of a group sharing ``total``: A^T = (G + lambda I)^-1 [P_1^T ...].

    Factored G = F^T F (m rows < in): by the Woodbury identity
    (lambda I + F^T F)^-1 = (1/lambda)(I - F^T (lambda I + F F^T)^-1 F), and since every P_k^T =
    F_k^T C_k^T lies in F's row space (P^T = F^T C with C = blockdiag(C_k^T) over the stacked rows),
    (lambda I + F^T F)^-1 F^T C = F^T (lambda I + F F^T)^-1 C (push-through): one Cholesky of the
    m x m matrix K + lambda I instead of the in x in one, and no 1/lambda cancellation. Dense G:
    Cholesky of G + lambda I; lambda = 0: the pseudo-inverse with eigenvalues under the Grams'
    rounding noise (``eps`` relative) cut. Returns {module: A [sum r_k, in]} and the method used.
    """
    if total.factor is not None and lam > 0:
        c = torch.cat([torch.block_diag(*[t.coef.T for t in terms]) for terms in present.values()], dim=1)
        eye = torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
        solved = total.factor.T @ torch.cholesky_solve(c, torch.linalg.cholesky(total.inner + lam * eye))
        how = "woodbury"
    else:
        rhs = torch.cat([t.p.T for terms in present.values() for t in terms], dim=1)  # [in, sum r_k]
        gram = total.matrix()
        if lam > 0:
            # (G + lam I) is symmetric positive definite: P_k (G + lam I)^-1 = ((G + lam I)^-1 P_k^T)^T.
            eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
            solved = torch.cholesky_solve(rhs, torch.linalg.cholesky(gram + lam * eye))
            how = "cholesky"
        else:
            # eigenvalues below the Grams' own rounding noise are treated as zero, not as data
            solved = torch.linalg.pinv(gram, rtol=eps * gram.shape[0], hermitian=True) @ rhs
            how = "pinv"
    widths = [sum(t.p.shape[0] for t in terms) for terms in present.values()]
    parts = solved.split(widths, dim=1)
    return {name: part.T.contiguous() for name, part in zip(present, parts, strict=True)}, how


def regmean(
    factors: list[Factors], grams: list[dict[str, Tensor]], ridge: float = DEFAULT_RIDGE
) -> tuple[Factors, dict[str, Any]]:
    """RegMean fusion, exactly, as a LoRA of rank sum_k r_k per module.

    M = sum_k delta_k G_k (G + lambda I)^-1 with G = sum_k G_k minimises
    sum_k ||X_k M^T - X_k delta_k^T||^2 + lambda ||M||^2: the fused layer reproduces each request's
    delta on that request's inputs. As factors: B = [B_1 ... B_K], A = [A_k G_k (G + lambda I)^-1]_k.
    lambda = ridge * trace(G) / in_dim per module (a fraction of the mean eigenvalue of G, so
    scale-free); it damps directions the requests' data barely reached. It must stay above the
    Grams' rounding noise (~1e-7 relative for float32, ~1e-2 for bfloat16: record Grams in float32
    or float64), or that noise is inverted as if it were data. ridge = 0 uses the pseudo-inverse
    (minimum-norm solution) with eigenvalues under that noise level cut. A module absent from some
    requests is fused over those present. Keys of ``grams[k]`` are the module names of ``factors[k]``.
    """
    if len(factors) != len(grams) or not factors:
        raise UserError(f"regmean needs one Gram dict per adapter, got {len(factors)} adapters, {len(grams)}")
    sums = RegMeanSums()
    for f, g in zip(factors, grams, strict=True):
        sums.add(f, g)
    return sums.fuse(ridge)


def svd_truncate(factors: Factors, rank: int) -> tuple[Factors, dict[str, float]]:
    """Best rank-``rank`` approximation of each ``B @ A`` (Eckart-Young), with its relative error.

    B = Q_b R_b and A^T = Q_a R_a give B A = Q_b (R_b R_a^T) Q_a^T, so only the small r x r core is
    decomposed, never the dense out x in delta. The kept singular values are split evenly
    (sqrt(S) on each side) so the factors stay balanced for further training. The error is
    ||B A - B' A'||_F / ||B A||_F = sqrt(sum of dropped sigma^2 / sum of all sigma^2).
    """
    if rank < 1:
        raise UserError(f"svd_truncate: rank must be at least 1, got {rank}")
    out: Factors = {}
    errors: dict[str, float] = {}
    for name, (b, a) in factors.items():
        qb, rb = torch.linalg.qr(b.double())
        qa, ra = torch.linalg.qr(a.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
        k = min(rank, s.shape[0])
        root = s[:k].sqrt()
        out[name] = ((qb @ u[:, :k] * root).to(b.dtype), (root[:, None] * vh[:k] @ qa.T).to(a.dtype))
        total = float(s.square().sum())
        errors[name] = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return out, errors


def peft_fusion(
    base_model: nn.Module,
    adapter_dirs: list[str | Path],
    method: str,
    weights: list[float] | None = None,
    density: float = 0.5,
) -> tuple[Factors, dict[str, Any]]:
    """Fuse saved adapters with peft's ``add_weighted_adapter`` (``linear``, ``ties``, ...).

    peft's ``linear`` / ``ties`` combine the A's and the B's separately (A = sum c_k A_k,
    B = sum c_k B_k with c_k = sqrt(w_k s_k), the sign on A), so B A has cross terms: not the sum of
    deltas, and every adapter must have the same r. ``cat`` is the exact weighted sum (rank sum_k r_k);
    ``*_svd`` work on dense deltas and truncate to the largest r. Returns factors with scaling 1,
    which is what peft intends (it sets lora_alpha = r); a fused adapter peft builds from rsLoRA
    adapters would otherwise carry a spurious sqrt(r). ``base_model`` is modified while this runs and
    restored (LoRA layers unloaded) before it returns; weights default to 1 each.
    """
    if method not in PEFT_METHODS:
        raise UserError(f"peft fusion method must be one of {', '.join(PEFT_METHODS)}, got {method!r}")
    if not adapter_dirs:
        raise UserError("peft_fusion: no adapters given")
    weights = [1.0] * len(adapter_dirs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapter_dirs):
        raise UserError(f"peft_fusion: {len(weights)} weights for {len(adapter_dirs)} adapters")
    uses_density = method in DENSITY_METHODS
    names = [f"request_{k}" for k in range(len(adapter_dirs))]
    with _adapter_errors(adapter_dirs[0]):
        model = PeftModel.from_pretrained(base_model, str(adapter_dirs[0]), adapter_name=names[0])
    try:
        for name, directory in zip(names[1:], adapter_dirs[1:], strict=True):
            with _adapter_errors(directory):
                model.load_adapter(str(directory), adapter_name=name)
        ranks = {model.peft_config[n].r for n in names}
        patterned = any(model.peft_config[n].rank_pattern for n in names)
        if method in SAME_RANK_METHODS and len(names) > 1 and (len(ranks) > 1 or patterned):
            raise UserError(
                f"peft's '{method}' fusion needs adapters of one rank, got r = {sorted(ranks)}"
                "; use 'cat', 'svd', 'ties_svd' or regmean"
            )
        model.add_weighted_adapter(
            names, weights, "fused", combination_type=method, density=density if uses_density else None
        )
        factors = lora_factors(model, "fused", scaling=1.0)
    finally:
        model.unload()
    info: dict[str, Any] = {"method": method, "weights": weights, "adapters": [str(d) for d in adapter_dirs]}
    if uses_density:
        info["density"] = density
    return factors, info


@contextmanager
def _adapter_errors(directory: str | Path) -> Iterator[None]:
    """peft's errors on an unreadable adapter or one for another base model, as one line naming it."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise UserError(refusal(directory, err)) from None
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as err:
        raise UserError(f"adapter '{directory}' cannot be loaded for fusion: {brief(err)}") from None


@contextmanager
def factors_applied(model: PeftModel, factors: Factors) -> Iterator[PeftModel]:
    """``model`` computing W x + B A x with ``factors`` in place of its own adapter, for evaluating a
    fused adapter of any rank without a second model or touching a weight: the live adapter is
    disabled and a forward hook adds (x A^T) B^T to each named layer's output."""
    layers = dict(model.named_modules())
    missing = [name for name in factors if not isinstance(layers.get(name), LoraLayer)]
    if missing:
        raise UserError(f"factors_applied: the model has no LoRA layer '{missing[0]}'")

    def hook(b: Tensor, a: Tensor):
        def add(module, args, output):
            x = args[0]
            return output + ((x.to(a.dtype) @ a.T) @ b.T).to(output.dtype)

        return add

    handles = []
    try:
        with model.disable_adapter():
            for name, (b, a) in factors.items():
                device = layers[name].base_layer.weight.device
                handles.append(layers[name].register_forward_hook(hook(b.to(device), a.to(device))))
            yield model
    finally:
        for handle in handles:
            handle.remove()


def save_factors(
    directory: str | Path, factors: Factors, base_config: dict[str, Any] | LoraConfig, info: dict[str, Any]
) -> Path:
    """Write ``factors`` as a standard peft adapter plus ``fusion.json`` (``info``), atomically.

    r = lora_alpha = the largest module rank (scaling 1, no rsLoRA); modules of smaller rank are
    zero-padded, which leaves B A unchanged. target_modules lists the exact module paths, so
    ``PeftModel.from_pretrained(base, directory)`` adapts those modules and no others. Task type,
    base model name/revision, dropout and fan_in_fan_out come from ``base_config``.
    """
    if not factors:
        raise UserError("save_factors: no modules to save")
    base = base_config.to_dict() if isinstance(base_config, LoraConfig) else dict(base_config)
    keep = ("task_type", "base_model_name_or_path", "revision", "lora_dropout", "fan_in_fan_out")
    r = max_rank(factors)
    config = LoraConfig(
        **{k: base[k] for k in keep if base.get(k) is not None},
        r=r,
        lora_alpha=r,
        target_modules=sorted(_relative(name) for name in factors),
    )
    state: dict[str, Tensor] = {}
    for name, (b, a) in factors.items():
        pad = r - a.shape[0]
        state[name + A_SUFFIX] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).detach().cpu().contiguous()
        state[name + B_SUFFIX] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).detach().cpu().contiguous()
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "fusion.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def _relative(name: str) -> str:
    """Module path inside the base model (what peft's target_modules and patterns match)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
