"""SequentialForgetting on a tiny model: per-request adapters, Gram matrices against an independent
computation, the fused adapter against RegMean's closed form, the ledger, and stacked mode."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA
from safetensors import safe_open

from lightning_unlearn.adapters import load_factors, load_grams
from lightning_unlearn.callbacks import ForgetRequest, SequentialForgetting
from lightning_unlearn.callbacks.sequential import records_hash
from lightning_unlearn.data.datamodule import UnlearningDataModule
from lightning_unlearn.data.formatting import PromptFormat, encode
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import LoraSpec, ModelSpec, load_adapter, load_model
from lightning_unlearn.objectives import GradDiff

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def _run(tmp_path, tiny_spec, world_dir, tokenizer_dir, mode):
    dm = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10",
                              retain_split="retain90", batch_size=4, max_length=64)  # fmt: skip
    dm.setup()
    ids = [r["id"] for r in dm.forget_records]
    requests = [ForgetRequest(name=f"r{k}", ids=ids[3 * k : 3 * k + 3]) for k in range(3)]
    callback = SequentialForgetting(str(tmp_path / mode), requests, mode=mode, epochs_per_request=2)
    torch.manual_seed(0)
    objective = GradDiff(
        model=tiny_spec, adapter=LoraSpec(r=4, alpha=8), optimizer=lambda p: torch.optim.SGD(p, lr=0.5)
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(objective, datamodule=dm)
    return tmp_path / mode, dm, requests, trainer


def test_independent_requests_fuse_to_regmean(tmp_path, tiny_spec, world_dir, tokenizer_dir):
    run, dm, requests, trainer = _run(tmp_path, tiny_spec, world_dir, tokenizer_dir, "independent")
    assert trainer.current_epoch == 6  # 3 requests x 2 epochs
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert [e["status"] for e in ledger] == ["done"] * 3
    for k, (entry, request) in enumerate(zip(ledger, requests, strict=True)):
        assert entry["ids"] == request.ids and entry["sha256"] == records_hash(dm.records_by_id(request.ids))
        for name in ("adapter_config.json", "adapter_model.safetensors", "grams.safetensors", "request.json"):
            assert (run / "requests" / str(k) / name).is_file()

    # Grams: layer 0's q_proj sees normed embeddings, which no adapter changes: recompute them with a
    # plain model, one unpadded record at a time.
    tokenizer, base = load_tokenizer(tokenizer_dir), load_model(tiny_spec)
    grams = [
        {n: g.matrix() for n, g in load_grams(run / "requests" / str(k) / "grams.safetensors").items()}
        for k in range(3)
    ]
    for k, request in enumerate(requests):
        want = torch.zeros(32, 32, dtype=torch.float64)

        def capture(module, args, want=want):
            x = args[0][0].double()
            want += x.T @ x

        handle = base.model.layers[0].self_attn.q_proj.register_forward_pre_hook(capture)
        with torch.no_grad():
            for record in dm.records_by_id(request.ids):
                ids = encode(record["question"], record["answer"], tokenizer, PromptFormat(), 64)["input_ids"]
                base(input_ids=torch.tensor([ids]))
        handle.remove()
        torch.testing.assert_close(grams[k][Q_PROJ].double(), want, rtol=1e-4, atol=1e-4)

    # The fused adapter is RegMean's closed form over the saved adapters, computed densely here.
    fused, info = load_factors(run / "fused"), json.loads((run / "fused" / "fusion.json").read_text())
    adapters = [load_factors(run / "requests" / str(k)) for k in range(3)]
    assert info["method"] == "regmean" and info["requests"] == 3
    for name in adapters[0]:
        deltas = [(b @ a).double() for b, a in (f[name] for f in adapters)]
        g = [gk[name].double() for gk in grams]
        total, lam = sum(g), info["lambda"][name]
        eye = torch.eye(len(total), dtype=torch.float64)
        want = sum(d @ gk for d, gk in zip(deltas, g, strict=True)) @ torch.linalg.inv(total + lam * eye)
        b, a = fused[name]
        torch.testing.assert_close((b @ a).double(), want, rtol=1e-5, atol=1e-6)

        # The stated bound: on the requests' own inputs the fused layer is at least as close to each
        # request's delta, in total, as averaging the deltas or keeping any single one of them.
        def misfit(m, deltas=deltas, g=g, lam=lam):
            own = sum(torch.trace((m - d) @ gk @ (m - d).T) for d, gk in zip(deltas, g, strict=True))
            return float(own + lam * (m * m).sum())

        fused_misfit = misfit((b @ a).double())
        for other in [sum(deltas) / len(deltas), *deltas]:
            assert fused_misfit <= misfit(other) * (1 + 1e-6) + 1e-12


def test_stacked_fused_is_the_last_adapter_and_bad_schedules_fail(
    tmp_path, tiny_spec, world_dir, tokenizer_dir
):
    run, _, _, _ = _run(tmp_path, tiny_spec, world_dir, tokenizer_dir, "stacked")
    fused, last = load_factors(run / "fused"), load_factors(run / "requests" / "2")
    for name, (b, a) in last.items():
        torch.testing.assert_close(fused[name][0] @ fused[name][1], b @ a)
    first = load_factors(run / "requests" / "0")
    assert any(not torch.allclose(first[n][0], last[n][0]) for n in last)  # it kept training
    with pytest.raises(UserError, match="mode must be"):
        SequentialForgetting(str(tmp_path), [ForgetRequest("a", ids=["x"])], mode="parallel")
    with pytest.raises(UserError, match="unique"):
        SequentialForgetting(str(tmp_path), [ForgetRequest("a", ids=["x"]), ForgetRequest("a", ids=["y"])])


def test_fused_model_is_evaluated_after_each_request(tmp_path, tiny_spec, world_dir, tokenizer_dir):
    """With an UnlearningEvaluation callback, each ledger line carries every request-so-far's forget
    quality: recomputed here from an independent evaluation of base + the saved fused adapter
    (loaded through peft, not our hooks) and scipy's KS test on that request's rows."""
    from scipy.stats import ks_2samp

    from lightning_unlearn.callbacks import UnlearningEvaluation
    from lightning_unlearn.evaluation import Evaluator, load_eval_splits
    from lightning_unlearn.models import load_adapter

    splits = load_eval_splits(str(world_dir), {"forget": "forget10_perturbed", "retain": "retain_perturbed"})
    tokenizer = load_tokenizer(tokenizer_dir)

    def evaluator(retain_truth_ratios=None):
        return Evaluator(tokenizer, splits, batch_size=8, max_new_tokens=4, max_length=64, progress=False,
                         retain_truth_ratios=retain_truth_ratios)  # fmt: skip

    # Any fixed reference truth ratios do for the check: the untouched base model's.
    reference = evaluator().run(load_model(tiny_spec)).per_sample["forget_truth_ratio"]
    evaluation = UnlearningEvaluation(every_n_epochs=1)
    evaluation.evaluator = evaluator(reference)

    dm = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10",
                              retain_split="retain90", batch_size=4, max_length=64)  # fmt: skip
    dm.setup()
    questions = {r["question"] for r in splits["forget"]}
    ids = [r["id"] for r in dm.forget_records if r["question"] in questions]
    requests = [ForgetRequest(name=f"r{k}", ids=ids[4 * k : 4 * k + 4]) for k in range(2)]
    callback = SequentialForgetting(str(tmp_path / "run"), requests, epochs_per_request=2)
    torch.manual_seed(0)
    objective = GradDiff(
        model=tiny_spec, adapter=LoraSpec(r=4, alpha=8), optimizer=lambda p: torch.optim.SGD(p, lr=2.0)
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[evaluation, callback],
    )  # fmt: skip
    trainer.fit(objective, datamodule=dm)

    ledger = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    assert [sorted(k for k in e["metrics"] if k.startswith("eval/forget_quality/")) for e in ledger] == [
        ["eval/forget_quality/r0"],
        ["eval/forget_quality/r0", "eval/forget_quality/r1"],
    ]
    # 1 evaluation before training + 1 per request; the callback's periodic ones were turned off.
    assert len(evaluation.history) == 3

    fused = load_adapter(load_model(tiny_spec), str(tmp_path / "run" / "fused"))
    report = evaluator(reference).run(fused)
    position = {r["question"]: i for i, r in enumerate(splits["forget"])}
    for request in requests:
        rows = [position[r["question"]] for r in dm.records_by_id(request.ids)]
        want = ks_2samp(
            [report.per_sample["forget_truth_ratio"][i] for i in rows], [reference[i] for i in rows]
        ).pvalue
        assert ledger[-1]["metrics"][f"eval/forget_quality/{request.name}"] == pytest.approx(want, rel=1e-6)
        mine = torch.tensor([report.per_sample["forget_truth_ratio"][i] for i in rows])
        base = torch.tensor([reference[i] for i in rows])
        got = ledger[-1]["metrics"][f"eval/forget_truth_ratio/{request.name}"]
        assert got == pytest.approx(torch.minimum(mine, 1 / mine).mean().item(), rel=1e-5)
        assert abs(got - torch.minimum(base, 1 / base).mean().item()) > 1e-3  # 100x the tolerance
    assert ledger[-1]["metrics"]["eval/model_utility"] == pytest.approx(
        report.metrics["model_utility"], rel=1e-4
    )
    assert ledger[-1]["metrics"]["eval/forget_truth_ratio"] == pytest.approx(
        report.metrics["forget_truth_ratio"], rel=1e-4
    )


def test_grams_are_stored_once_per_input_factored_and_fuse_to_regmean(tmp_path, world_dir, tokenizer_dir):
    """A model wider than a request's token count: each request's file holds one entry per
    distinct layer input (q/k/v share one, gate/up another), factored where the request has fewer
    tokens than the layer has inputs. Every module's Gram is recomputed here from base + that
    request's saved adapter loaded by peft, one unpadded record at a time, and the fused adapter
    (Woodbury where the stacked factors are thinner than the layer) is RegMean's closed form over
    the stored Grams, computed densely."""
    spec = ModelSpec(
        config={**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 192}, tokenizer=tokenizer_dir
    )
    dm = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10",
                              retain_split="retain90", batch_size=4, max_length=64)  # fmt: skip
    dm.setup()
    ids = [r["id"] for r in dm.forget_records]
    bounds = [(0, 2), (2, 4), (4, 8)]  # 2, 2 and 4 records: ~40, ~40, ~80 tokens
    requests = [ForgetRequest(name=f"r{k}", ids=ids[a:b]) for k, (a, b) in enumerate(bounds)]
    callback = SequentialForgetting(str(tmp_path / "run"), requests, epochs_per_request=1)
    torch.manual_seed(0)
    objective = GradDiff(
        model=spec, adapter=LoraSpec(r=4, alpha=8), optimizer=lambda p: torch.optim.SGD(p, lr=0.5)
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(objective, datamodule=dm)

    run, tokenizer, layer = (
        tmp_path / "run",
        load_tokenizer(tokenizer_dir),
        "base_model.model.model.layers.0.",
    )
    q, gate = layer + "self_attn.q_proj", layer + "mlp.gate_proj"
    stored_grams, kinds = [], set()
    for k, request in enumerate(requests):
        path = run / "requests" / str(k) / "grams.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            keys, metadata = set(handle.keys()), handle.metadata()
        assert keys == {q, layer + "self_attn.o_proj", gate, layer + "mlp.down_proj"}
        layout = json.loads(metadata["lightning_unlearn.grams"])
        modules, entries = layout["modules"], layout["entries"]
        assert {modules[layer + f"self_attn.{p}_proj"] for p in "qkv"} == {q}
        assert modules[layer + "mlp.up_proj"] == gate and len(modules) == 7
        encoded = [
            encode(r["question"], r["answer"], tokenizer, PromptFormat(), 64)["input_ids"]
            for r in dm.records_by_id(request.ids)
        ]
        tokens = sum(len(e) for e in encoded)
        for key, entry in entries.items():
            rows, in_dim = entry["shape"]
            assert entry["kind"] == ("factor" if tokens < in_dim else "dense")
            # Identical rows are stored once. q_proj reads the normed embeddings (RoPE comes later):
            # one row per distinct token. Every later input is a function of the token's prefix
            # (causal attention): one row per distinct prefix (records share a prompt's first tokens).
            if key == q:
                distinct = len({t for e in encoded for t in e})
            else:
                distinct = len({tuple(e[: i + 1]) for e in encoded for i in range(len(e))})
            assert distinct < tokens
            assert rows == (distinct if tokens < in_dim else in_dim)
            kinds.add(entry["kind"])

        peft = load_adapter(load_model(spec), str(run / "requests" / str(k)))
        want: dict[str, torch.Tensor] = {}

        def capture(name, want=want):
            def add(module, args):
                x = args[0][0].double()
                want[name] = want.get(name, 0) + x.T @ x

            return add

        hooks = [m.register_forward_pre_hook(capture(n)) for n, m in peft.named_modules() if n in modules]
        with torch.no_grad():
            for ids_ in encoded:
                peft(input_ids=torch.tensor([ids_]))
        for hook in hooks:
            hook.remove()
        stored = load_grams(path)
        assert stored.keys() == want.keys()
        for name, gram in stored.items():
            torch.testing.assert_close(gram.matrix(), want[name], rtol=1e-4, atol=1e-4)
        stored_grams.append({name: gram.matrix() for name, gram in stored.items()})
    assert kinds == {"factor", "dense"}

    fused, info = load_factors(run / "fused"), json.loads((run / "fused" / "fusion.json").read_text())
    adapters = [load_factors(run / "requests" / str(k)) for k in range(3)]
    # stacked rows (~160) under down_proj's 192 inputs, over the others' 64
    assert set(info["solve"].values()) == {"woodbury", "cholesky"}
    for name in adapters[0]:
        g = [grams[name] for grams in stored_grams]
        total = sum(g)
        eye = torch.eye(len(total), dtype=torch.float64)
        rhs = sum((b @ a).double() @ gk for (b, a), gk in zip((f[name] for f in adapters), g, strict=True))
        expected = rhs @ torch.linalg.inv(total + info["lambda"][name] * eye)
        b, a = fused[name]
        assert float(((b @ a).double() - expected).norm() / expected.norm()) < 1e-5, name
