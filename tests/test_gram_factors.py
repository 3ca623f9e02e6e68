"""Factored Grams: the stored factor against X^T X, the packed file format (one entry per distinct
input, the earlier dense format still read), and RegMean over factors (Woodbury) against the dense
closed form computed here from the raw rows, in float64: all factored, stacked rank above in_dim,
mixed dense and factored requests, shared inputs, a module missing from a request, ridge 0."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_unlearn.adapters import (
    GRAMS_KEY,
    Gram,
    RegMeanSums,
    factor_of_rows,
    load_grams,
    pack_triu,
    regmean,
    save_grams,
    unpack_triu,
)
from lightning_unlearn.errors import UserError

F64 = torch.float64
# module -> (in_dim, out_dim, input group): q/k/v read one input, gate/up another
MODULES = {
    "q": (24, 24, "attn"),
    "k": (24, 8, "attn"),
    "v": (24, 8, "attn"),
    "o": (24, 24, "o"),
    "gate": (40, 40, "mlp"),
    "up": (40, 40, "mlp"),
    "down": (40, 24, "down"),
}
GROUP_DIM = {group: dim for dim, _, group in MODULES.values()}


def rows(n: int, in_dim: int, generator: torch.Generator) -> torch.Tensor:
    """n rows with a spread of scales (activations are not isotropic)."""
    scale = torch.logspace(-1, 1, in_dim, dtype=F64)
    return torch.randn(n, in_dim, generator=generator, dtype=F64) * scale


def request(seed: int, tokens: dict[str, int], rank: int = 3, dense: bool = False, skip=()) -> dict:
    """One request: LoRA factors per module, raw rows per input group and the Grams the callback
    would record (factored where rows < in_dim unless ``dense``), shared by the group's modules."""
    generator = torch.Generator().manual_seed(seed)
    xs = {group: rows(tokens[group], dim, generator) for group, dim in GROUP_DIM.items()}
    by_group = {
        group: Gram(dense=x.T @ x) if dense or x.shape[0] >= x.shape[1] else Gram(factor=factor_of_rows(x))
        for group, x in xs.items()
    }
    factors, grams = {}, {}
    for name, (in_dim, out_dim, group) in MODULES.items():
        if name in skip:
            continue
        b = torch.randn(out_dim, rank, generator=generator, dtype=F64)
        factors[name] = (b, torch.randn(rank, in_dim, generator=generator, dtype=F64))
        grams[name] = by_group[group]
    return {"factors": factors, "grams": grams, "xs": xs}


def dense_closed_form(requests: list[dict], name: str, ridge: float, grams=None) -> torch.Tensor:
    """M = sum_k delta_k G_k (G + lambda I)^-1 from the raw rows (G_k = X_k^T X_k; or from the
    dense ``grams`` of one request), or with lambda = 0 the minimum-norm solution (pseudo-inverse)."""
    group = MODULES[name][2]
    present = [r for r in requests if name in r["factors"]]
    grams = [r["xs"][group].T @ r["xs"][group] for r in present] if grams is None else [grams[name].double()]
    total = sum(grams)
    rhs = sum(b @ a @ g for (b, a), g in zip((r["factors"][name] for r in present), grams, strict=True))
    lam = ridge * float(total.trace()) / total.shape[0]
    if lam == 0:
        return rhs @ torch.linalg.pinv(total, hermitian=True)
    return torch.linalg.solve(total + lam * torch.eye(total.shape[0], dtype=F64), rhs, left=False)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_factor_of_rows_is_exact_canonical_and_thin():
    generator = torch.Generator().manual_seed(0)
    x = rows(12, 30, generator)
    x = torch.cat([x, x[:3], x[:1]])  # a shared prompt prefix: 4 duplicated rows
    r = factor_of_rows(x)
    assert r.shape == (12, 30)  # one row per distinct input row
    assert torch.equal(r, r.triu()) and bool((r.diagonal() >= 0).all())
    torch.testing.assert_close(r.T @ r, x.T @ x, rtol=1e-12, atol=1e-10)
    # the same factor whatever the row order (rows gathered from 1 or 2 ranks)...
    torch.testing.assert_close(factor_of_rows(x.flip(0)), r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(factor_of_rows(torch.cat([x[7:], x[:7]])), r, rtol=1e-9, atol=1e-9)
    # ...and, rows all distinct, from the factors of two halves
    halves = torch.cat([factor_of_rows(x[:6]), factor_of_rows(x[6:12])])
    torch.testing.assert_close(factor_of_rows(halves), factor_of_rows(x[:12]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(5, 9), (9, 9)])
def test_pack_triu_round_trip(shape):
    m = torch.randn(*shape, dtype=F64).triu()
    packed = pack_triu(m)
    assert packed.numel() == shape[0] * shape[1] - shape[0] * (shape[0] - 1) // 2
    assert torch.equal(unpack_triu(packed, shape, symmetric=False), m)
    if shape[0] == shape[1]:
        s = m + m.triu(1).T
        assert torch.equal(unpack_triu(pack_triu(s), shape, symmetric=True), s)


# tokens per input group for each request; in_dims are 24 (attn, o) and 40 (mlp, down)
FEW = {"attn": 5, "o": 6, "mlp": 7, "down": 8}  # 3 requests stack 15..24 rows: under in_dim
MANY = {"attn": 11, "o": 9, "mlp": 17, "down": 15}  # 3 requests stack 27..51: over in_dim


@pytest.mark.parametrize(
    ("case", "requests", "solves"),
    [
        ("factored", lambda: [request(k, FEW) for k in range(3)], {"woodbury"}),
        ("rank above in_dim", lambda: [request(k, MANY) for k in range(3)], {"cholesky"}),
        (
            "mixed",
            lambda: [request(0, FEW), request(1, FEW, dense=True), request(2, FEW)],
            {"cholesky"},
        ),
        (
            "mixed per module",
            lambda: [request(0, FEW), request(1, {**FEW, "down": 41}), request(2, FEW, skip=("k",))],
            {"woodbury", "cholesky"},
        ),
    ],
)
@pytest.mark.parametrize("ridge", [1e-4, 0.3])
def test_regmean_over_factors_equals_dense_closed_form(case, requests, solves, ridge):
    requests = requests()
    fused, info = regmean([r["factors"] for r in requests], [r["grams"] for r in requests], ridge=ridge)
    assert set(info["solve"].values()) == solves
    for name, (b, a) in fused.items():
        present = [r for r in requests if name in r["factors"]]
        assert a.shape[0] == b.shape[1] == 3 * len(present)
        assert relative_error(b @ a, dense_closed_form(requests, name, ridge)) < 1e-6, (case, name)
    # shared inputs are solved once: one lambda per input group
    assert info["lambda"]["q"] == info["lambda"]["v"] and info["lambda"]["gate"] == info["lambda"]["up"]
    if case == "mixed per module":
        assert info["solve"]["down"] == "cholesky" and info["solve"]["q"] == "woodbury"
        assert "k" in fused and fused["k"][1].shape[0] == 6  # fused over the two requests it was in


def test_running_sums_cross_in_dim_and_match_a_fresh_fusion():
    """Adding requests one by one: the sums start factored and turn dense at in_dim rows; each
    fusion along the way equals the dense closed form over the requests so far."""
    requests = [request(k, {"attn": 10, "o": 10, "mlp": 15, "down": 15}) for k in range(4)]
    sums = RegMeanSums()
    for k, r in enumerate(requests):
        sums.add(r["factors"], r["grams"])
        fused, info = sums.fuse(1e-3)
        assert info["solve"]["q"] == ("woodbury" if 10 * (k + 1) < 24 else "cholesky")
        assert info["solve"]["down"] == ("woodbury" if 15 * (k + 1) < 40 else "cholesky")
        for name, (b, a) in fused.items():
            assert relative_error(b @ a, dense_closed_form(requests[: k + 1], name, 1e-3)) < 1e-6
    assert sums.sums["q"] is sums.sums["k"] is sums.sums["v"] and sums.sums["gate"] is sums.sums["up"]
    assert sums.sums["q"] is not sums.sums["o"]


def test_ridge_zero_over_factors_is_the_minimum_norm_solution():
    requests = [request(k, FEW) for k in range(2)]
    fused, info = regmean([r["factors"] for r in requests], [r["grams"] for r in requests], ridge=0.0)
    assert set(info["solve"].values()) == {"pinv"}
    for name, (b, a) in fused.items():
        assert relative_error(b @ a, dense_closed_form(requests, name, 0.0)) < 1e-6


def test_grams_file_stores_each_input_once_and_fuses_the_same(tmp_path):
    requests = [request(0, {**FEW, "mlp": 41}), request(1, FEW)]
    paths = []
    for k, r in enumerate(requests):
        paths.append(tmp_path / f"grams{k}.safetensors")
        save_grams(paths[-1], r["grams"])
    with safe_open(str(paths[0]), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert keys == {"q", "o", "gate", "down"}  # one per distinct input, named by its first reader
    assert list(metadata) == [GRAMS_KEY]
    layout = json.loads(metadata[GRAMS_KEY])
    modules, entries = layout["modules"], layout["entries"]
    assert modules == {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
    assert entries["q"] == {"kind": "factor", "shape": [5, 24]}
    assert entries["gate"] == {"kind": "dense", "shape": [40, 40]}
    with safe_open(str(paths[0]), framework="pt") as handle:
        assert handle.get_tensor("q").numel() == 5 * 24 - 5 * 4 // 2  # packed trapezoid
        assert handle.get_tensor("gate").numel() == 40 * 41 // 2  # packed triangle

    loaded = [load_grams(p) for p in paths]
    assert loaded[0]["q"] is loaded[0]["k"] is loaded[0]["v"] and loaded[0]["gate"] is loaded[0]["up"]
    for r, grams in zip(requests, loaded, strict=True):
        for name, (_, _, group) in MODULES.items():
            x = r["xs"][group]
            torch.testing.assert_close(grams[name].matrix(), x.T @ x, rtol=1e-6, atol=1e-5)
    want, _ = regmean([r["factors"] for r in requests], [r["grams"] for r in requests])
    got, _ = regmean([r["factors"] for r in requests], loaded)
    for name, (b, a) in want.items():
        assert relative_error(got[name][0] @ got[name][1], b @ a) < 1e-5  # float32 storage


def test_earlier_dense_grams_file_still_loads(tmp_path):
    r = request(0, MANY)
    path = tmp_path / "grams.safetensors"
    old = {n: g.matrix().float() for n, g in r["grams"].items()}  # one dense float32 Gram per module
    save_file(old, str(path))
    grams = load_grams(path)
    assert grams.keys() == r["grams"].keys()
    for name, gram in grams.items():
        assert gram.factor is None and torch.equal(gram.dense, old[name])
    want = {name: dense_closed_form([{**r, "xs": None}], name, 1e-4, old) for name in old}
    got, info = regmean([r["factors"]], [grams])
    assert set(info["solve"].values()) == {"cholesky"}
    for name, (b, a) in got.items():
        assert relative_error(b @ a, want[name]) < 1e-6


def test_damaged_grams_metadata_is_named(tmp_path):
    path = tmp_path / "grams.safetensors"
    save_grams(path, request(0, FEW)["grams"])
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    # a shape the packed tensor does not fit, one that would allocate 80 GB, a dense entry not square
    for key, shape, kind in [
        ("q", [6, 24], "factor"),
        ("q", [10**5, 10**5], "factor"),
        ("gate", [7, 40], "dense"),
    ]:
        layout = json.loads(metadata[GRAMS_KEY])
        layout["entries"][key] = {"kind": kind, "shape": shape}
        save_file(tensors, str(path), metadata={GRAMS_KEY: json.dumps(layout)})
        with pytest.raises(UserError, match="is not a readable Gram file"):
            load_grams(path)
    square = tmp_path / "old.safetensors"
    save_file({"q": torch.zeros(3, 4)}, str(square))
    with pytest.raises(UserError, match="not square"):
        load_grams(square)


def test_the_same_grams_save_to_the_same_bytes(tmp_path):
    """Two identical runs must write identical files: safetensors writes its metadata map in hash
    order, which changes between saves, so the layout lives under one key."""
    grams = request(0, {**FEW, "mlp": 41})["grams"]
    saved = []
    for k in range(8):
        save_grams(tmp_path / f"{k}.safetensors", grams)
        saved.append((tmp_path / f"{k}.safetensors").read_bytes())
    assert all(b == saved[0] for b in saved)
