"""SequentialForgetting on a tiny model: per-request adapters, Gram matrices against an independent
computation, the fused adapter against RegMean's closed form, the ledger, and stacked mode."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_unlearn.adapters import load_factors
from lightning_unlearn.callbacks import ForgetRequest, SequentialForgetting
from lightning_unlearn.callbacks.sequential import records_hash
from lightning_unlearn.data.datamodule import UnlearningDataModule
from lightning_unlearn.data.formatting import PromptFormat, encode
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import LoraSpec, load_model
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
    grams = [load_file(str(run / "requests" / str(k) / "grams.safetensors")) for k in range(3)]
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
