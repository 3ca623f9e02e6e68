"""Adapter fusion: RegMean against the dense closed form, saving/loading through peft, SVD truncation
against a dense SVD, and peft's linear / ties / cat against their formulas recomputed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from lightning_unlearn.adapters import (
    Factors,
    delta,
    load_factors,
    lora_factors,
    peft_fusion,
    regmean,
    save_factors,
    svd_truncate,
)
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import ModelSpec, load_model

# (r, lora_alpha, use_rslora, target_modules): different ranks and scalings, one on a subset of layers.
SPECS = [
    (2, 4, False, "all-linear"),
    (3, 6, True, "all-linear"),
    (4, 2, False, ["q_proj", "v_proj"]),
]
N_ROWS = 24  # forget-data rows per request: fewer than intermediate_size, so some G_k are singular


def base_model():
    return load_model(ModelSpec(config={**TINY_LLAMA, "vocab_size": 64}))


def make_adapter(directory: Path, r: int, alpha: int, rslora: bool, targets, seed: int) -> Factors:
    config = LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base_model(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(directory))
    return lora_factors(model)


def random_grams(factors: Factors, seed: int, rows: int = N_ROWS, dtype=torch.float32) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    xs = {
        name: torch.randn(rows, a.shape[1], generator=generator, dtype=dtype)
        for name, (_, a) in factors.items()
    }
    return {name: x.T @ x for name, x in xs.items()}, xs


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    root = tmp_path_factory.mktemp("requests")
    out = []
    for k, (r, alpha, rslora, targets) in enumerate(SPECS):
        directory = root / str(k)
        factors = make_adapter(directory, r, alpha, rslora, targets, seed=k)
        grams, xs = random_grams(factors, seed=100 + k)
        out.append({"dir": directory, "factors": factors, "grams": grams, "xs": xs})
    return out


def dense_regmean(deltas: list[torch.Tensor], grams: list[torch.Tensor], lam: float) -> torch.Tensor:
    """M = sum_k delta_k G_k (G + lambda I)^-1, straight from the formula (float64)."""
    gram = sum(g.double() for g in grams)
    rhs = sum(d.double() @ g.double() for d, g in zip(deltas, grams, strict=True))
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), rhs, left=False)


def test_load_factors_matches_live_model_and_peft_delta(requests):
    for k, request in enumerate(requests):
        loaded = load_factors(request["dir"])
        assert loaded.keys() == request["factors"].keys()
        model = PeftModel.from_pretrained(base_model(), str(request["dir"]))
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        assert layers.keys() == loaded.keys()
        for name, layer in layers.items():
            # peft's own delta (its scaling, rsLoRA included) against B @ A with scaling folded into B
            torch.testing.assert_close(
                delta(loaded, name), layer.get_delta_weight("default"), rtol=1e-6, atol=1e-7
            )
            assert loaded[name][1].shape[0] == SPECS[k][0]
    assert "base_model.model.model.layers.0.self_attn.q_proj" in requests[0]["factors"]
    assert len(requests[0]["factors"]) == 7 and len(requests[2]["factors"]) == 2


@pytest.mark.parametrize("ridge", [1e-4, 0.3])
def test_regmean_equals_dense_closed_form(requests, ridge):
    fused, info = regmean([r["factors"] for r in requests], [r["grams"] for r in requests], ridge=ridge)
    assert info["method"] == "regmean" and info["ridge"] == ridge
    assert fused.keys() == requests[0]["factors"].keys()
    for name, (b, a) in fused.items():
        present = [r for r in requests if name in r["factors"]]
        assert len(present) == (3 if name.endswith(("q_proj", "v_proj")) else 2)
        assert a.shape[0] == b.shape[1] == sum(r["factors"][name][1].shape[0] for r in present)
        assert a.dtype == b.dtype == torch.float32
        gram = sum(r["grams"][name].double() for r in present)
        lam = ridge * float(gram.trace()) / gram.shape[0]
        assert info["lambda"][name] == pytest.approx(lam, rel=1e-12)
        expected = dense_regmean(
            [delta(r["factors"], name) for r in present], [r["grams"][name] for r in present], lam
        )
        torch.testing.assert_close((b @ a).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("ridge", "dtype"),
    [(1e-9, torch.float64), (0.0, torch.float64), (0.0, torch.float32), (1e-4, torch.float32)],
)
def test_regmean_single_request_reproduces_its_delta_on_its_data(requests, ridge, dtype):
    factors = requests[1]["factors"]
    # 12 rows < 32 inputs: G is rank-deficient (a float32 G has ~1e-7 noise in its null space)
    grams, xs = random_grams(factors, seed=7, rows=12, dtype=dtype)
    fused, _ = regmean([factors], [grams], ridge=ridge)
    for name in factors:
        x, m, d = xs[name].double(), delta(fused, name).double(), delta(factors, name).double()
        torch.testing.assert_close(x @ m.T, x @ d.T, rtol=1e-4, atol=1e-4 * float((x @ d.T).abs().max()))
        # ...while M is the projection of delta on the data's row space, not delta itself
        assert float((m - d).norm()) > 0.1 * float(d.norm())


def test_regmean_rejects_a_missing_gram(requests):
    grams = [dict(r["grams"]) for r in requests]
    grams[1].pop(next(iter(grams[1])))
    with pytest.raises(UserError, match="no Gram matrix"):
        regmean([r["factors"] for r in requests], grams)


def test_saved_fused_adapter_loads_as_w_plus_m(requests, tmp_path):
    fused, info = regmean([r["factors"] for r in requests], [r["grams"] for r in requests])
    base_config = json.loads((requests[0]["dir"] / "adapter_config.json").read_text())
    target = tmp_path / "fused"
    assert save_factors(target, fused, base_config, info) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]  # no temp directory left behind
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 9 and not config["use_rslora"]
    assert json.loads((target / "fusion.json").read_text())["lambda"] == pytest.approx(info["lambda"])

    reference = dict(base_model().named_parameters())
    merged = PeftModel.from_pretrained(base_model(), str(target)).merge_and_unload()
    params = dict(merged.named_parameters())
    assert params.keys() == reference.keys()
    for name in params:
        module = "base_model.model." + name.removesuffix(".weight")
        expected = reference[name] + delta(fused, module) if module in fused else reference[name]
        torch.testing.assert_close(params[name], expected, rtol=1e-6, atol=1e-6)
    assert sum(1 for n in params if "base_model.model." + n.removesuffix(".weight") in fused) == 7
    # save/load round trip: the zero-padded rank-5 modules read back to the same deltas
    for name, (b, a) in load_factors(target).items():
        torch.testing.assert_close(b @ a, delta(fused, name))


def test_svd_truncate_matches_dense_svd(requests):
    fused, _ = regmean([r["factors"] for r in requests], [r["grams"] for r in requests])
    name = "base_model.model.model.layers.0.self_attn.q_proj"  # rank 9 = 2 + 3 + 4
    same, errors = svd_truncate(fused, rank=9)
    for module in fused:
        assert errors[module] < 1e-6
        torch.testing.assert_close(delta(same, module), delta(fused, module), rtol=1e-5, atol=1e-5)
    for k in (1, 3, 6):
        truncated, errors = svd_truncate(fused, rank=k)
        dense = delta(fused, name).double()
        u, s, vh = torch.linalg.svd(dense)
        expected_error = float(s[k:].square().sum().sqrt() / dense.norm())
        assert errors[name] == pytest.approx(expected_error, rel=1e-6)
        b, a = truncated[name]
        assert b.shape == (dense.shape[0], k) and a.shape == (k, dense.shape[1])
        best = u[:, :k] * s[:k] @ vh[:k]  # Eckart-Young: the rank-k truncation (distinct singular values)
        torch.testing.assert_close((b @ a).double(), best, rtol=1e-5, atol=1e-5)
        assert float((b @ a).double().sub(dense).norm() / dense.norm()) == pytest.approx(
            expected_error, rel=1e-4
        )


def same_rank_pair(tmp_path) -> list[tuple[Path, Factors]]:
    out = []
    for k, alpha in enumerate((4, 8)):
        directory = tmp_path / f"eq{k}"
        out.append((directory, make_adapter(directory, 2, alpha, False, ["q_proj", "v_proj"], seed=20 + k)))
    return out


def test_peft_linear_combines_factors_as_documented(tmp_path):
    pair = same_rank_pair(tmp_path)
    weights = [1.0, -0.5]
    base = base_model()
    before = {n: p.clone() for n, p in base.named_parameters()}
    fused, info = peft_fusion(base, [d for d, _ in pair], "linear", weights=weights)
    assert info["method"] == "linear" and "density" not in info
    # base model handed back without LoRA layers and unchanged
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n])
    for name in pair[0][1]:
        # peft: A = sum sign_k c_k A_k, B = sum c_k B_k, c_k = sqrt(|w_k s_k|); scaling 1 (alpha = r)
        a_sum, b_sum = 0, 0
        for (_, factors), w, s in zip(pair, weights, [4 / 2, 8 / 2], strict=True):
            b, a = factors[name]
            b = b / s  # undo the folded scaling to get the raw lora_B
            c = math.sqrt(abs(w * s))
            a_sum = a_sum + math.copysign(c, w) * a.double()
            b_sum = b_sum + c * b.double()
        torch.testing.assert_close(delta(fused, name).double(), b_sum @ a_sum, rtol=1e-5, atol=1e-6)
        exact = sum(w * delta(f, name).double() for (_, f), w in zip(pair, weights, strict=True))
        assert float((delta(fused, name).double() - exact).norm()) > 0.1 * float(exact.norm())  # cross terms


def ties_reference(tensors: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023) as peft documents it: trim, elect sign, disjoint mean."""
    trimmed = []
    for t in tensors:
        keep = int(density * t.numel())
        threshold = t.abs().flatten().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    stack = torch.stack(trimmed)
    elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = stack.sign() == elected
    weighted = stack * torch.tensor(weights, dtype=stack.dtype)[:, None, None]
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_peft_ties_combines_factors_as_documented(tmp_path):
    pair = same_rank_pair(tmp_path)
    weights, density = [1.0, 0.7], 0.5
    fused, info = peft_fusion(base_model(), [d for d, _ in pair], "ties", weights=weights, density=density)
    assert info["density"] == density
    scales = [4 / 2, 8 / 2]
    for name in pair[0][1]:
        raw = [(f[name][0] / s, f[name][1]) for (_, f), s in zip(pair, scales, strict=True)]
        c = [math.sqrt(w * s) for w, s in zip(weights, scales, strict=True)]
        a = ties_reference([r[1].double() for r in raw], c, density)
        b = ties_reference([r[0].double() for r in raw], c, density)
        torch.testing.assert_close(delta(fused, name).double(), b @ a, rtol=1e-5, atol=1e-6)
        assert (fused[name][1] == 0).float().mean() > 0.2  # trimming did zero out entries


def test_peft_cat_is_the_exact_weighted_sum_and_linear_needs_equal_ranks(requests):
    # the rsLoRA adapter first: peft copies its config (use_rslora) into the fused one, whose live
    # scaling is then sqrt(r) instead of 1; peft_fusion reads the factors with scaling 1
    requests = [requests[1], requests[0], requests[2]]
    dirs = [r["dir"] for r in requests]
    weights = [1.0, 0.5, -2.0]
    fused, _ = peft_fusion(base_model(), dirs, "cat", weights=weights)
    for name, (b, a) in fused.items():
        exact = sum(
            w * delta(r["factors"], name)
            for r, w in zip(requests, weights, strict=True)
            if name in r["factors"]
        )
        torch.testing.assert_close(b @ a, exact, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="one rank"):
        peft_fusion(base_model(), dirs, "linear")
    with pytest.raises(UserError, match="must be one of"):
        peft_fusion(base_model(), dirs, "average")
