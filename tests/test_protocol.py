"""The TOFU protocol end to end on a miniature synthetic world with a tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_LLAMA
from helpers import record_fits
from scipy.stats import ks_2samp

from lightning_unlearn.data.synthetic import WorldConfig
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import LoraSpec, ModelSpec, load_adapter, load_model
from lightning_unlearn.objectives import NPO, FineTune, GradAscent, GradDiff, IdkAP, InfluenceStep
from lightning_unlearn.protocol import (
    AdapterFit,
    DataSettings,
    EvalSettings,
    Protocol,
    SequentialSettings,
    Stage,
)


def _adamw(lr: float):
    import torch

    return lambda params: torch.optim.AdamW(params, lr=lr)


def _protocol(tmp_path, **overrides) -> Protocol:
    settings = {
        "name": "mini",
        "model": ModelSpec(config=dict(TINY_LLAMA, hidden_size=64, intermediate_size=128)),
        "finetune": Stage(objective=FineTune(optimizer=_adamw(3e-3)), max_epochs=12, batch_size=16),
        "objectives": {
            "ga": Stage(objective=GradAscent(optimizer=_adamw(1e-3)), max_epochs=2, batch_size=4),
            "gd": Stage(
                objective=GradDiff(optimizer=_adamw(1e-3)), max_epochs=2, batch_size=4, eval_every_n_epochs=1
            ),
            # NPO builds its cached reference inside fit; IdkAP needs the refusal sub-batches.
            "npo": Stage(objective=NPO(optimizer=_adamw(1e-3)), max_epochs=2, batch_size=4),
            "idk_ap": Stage(objective=IdkAP(optimizer=_adamw(1e-3)), max_epochs=2, batch_size=4),
            # Two deletion requests, one LoRA each, fused; evaluated after each request.
            "seq": Stage(
                objective=GradDiff(adapter=LoraSpec(r=4, alpha=8), optimizer=_adamw(1e-2)),
                batch_size=4,
                sequential=SequentialSettings(requests=2, epochs_per_request=2),
            ),
            # A rank-1 LoRA fitted on forget + retain, then the forget split removed by one solve.
            "infl": Stage(
                objective=InfluenceStep(damping=0.05, max_iter=30),
                batch_size=32,
                adapter_fit=AdapterFit(
                    objective=FineTune(
                        adapter=LoraSpec(r=1, alpha=2, target_modules=["q_proj", "v_proj"]),
                        optimizer=_adamw(1e-2),
                    ),
                    max_epochs=3,
                    batch_size=16,
                ),
            ),
        },
        "data": DataSettings(
            world=WorldConfig(
                seed=1, n_authors=10, n_forget_authors=1, n_world_facts=10, n_eval_retain_authors=3
            ),
            eval_splits={
                "forget": "forget10_perturbed",
                "retain": "retain_perturbed",
                "world_facts": "world_facts_perturbed",
                "holdout": "holdout10",
            },
            max_length=64,
        ),
        "evaluation": EvalSettings(batch_size=32, max_new_tokens=8),
        "trainer": {"enable_progress_bar": False},
        "out_dir": str(tmp_path / "runs"),
        **overrides,
    }
    return Protocol(**settings)


def test_protocol_writes_one_report_entry_per_model(tmp_path):
    reports = _protocol(tmp_path).run()
    run = tmp_path / "runs" / "mini"
    saved = json.loads((run / "report.json").read_text())
    assert list(saved) == ["finetuned", "retain", "ga", "gd", "npo", "idk_ap", "seq", "infl"]
    for name, entry in saved.items():
        assert entry["metrics"] == pytest.approx(reports[name].metrics)
        assert (run / "models" / name / "config.json").is_file()
        assert (run / "reports" / name / "report.md").is_file()
        for metric in ("forget_quality", "model_utility", "forget_truth_ratio", "retain_Q_A_ROUGE"):
            assert 0.0 <= entry["metrics"][metric] <= 1.0
    # The retain model is the reference distribution: KS of a sample against itself.
    assert saved["retain"]["metrics"]["forget_quality"] == 1.0
    # The target was trained on the forget answers, the retain model was not: its forget answers
    # are likelier, and a membership-inference attack tells them from holdout answers better.
    assert saved["finetuned"]["metrics"]["forget_Q_A_Prob"] > saved["retain"]["metrics"]["forget_Q_A_Prob"]
    assert saved["finetuned"]["metrics"]["mia_min_k"] > saved["retain"]["metrics"]["mia_min_k"]
    retain_auc = saved["retain"]["metrics"]["mia_min_k"]
    for name in ("finetuned", "ga"):
        auc = saved[name]["metrics"]["mia_min_k"]
        assert saved[name]["metrics"]["privleak"] == pytest.approx(
            ((1 - auc) - (1 - retain_auc)) / (1 - retain_auc) * 100
        )
    # Without the retain model: each model's forget vs its own holdout answer probabilities (KS),
    # which ranks the retain model (never saw either) above the target (memorised forget only).
    for entry in saved.values():
        per_sample = entry["per_sample"]
        assert entry["metrics"]["forget_quality_holdout"] == pytest.approx(
            ks_2samp(per_sample["forget_Q_A_Prob"], per_sample["holdout_Q_A_Prob"]).pvalue, rel=1e-9
        )
    assert (
        saved["retain"]["metrics"]["forget_quality_holdout"]
        > saved["finetuned"]["metrics"]["forget_quality_holdout"]
    )
    header = (run / "report.md").read_text().splitlines()[0]
    assert "| forget_quality_holdout |" in header and "| mia_gap |" in header
    # Gradient ascent, NPO and refusal training lower the probability of the forget answers.
    for name in ("ga", "npo", "idk_ap"):
        assert saved[name]["metrics"]["forget_Q_A_Prob"] < saved["finetuned"]["metrics"]["forget_Q_A_Prob"]
    # Splits: the target's training set is retain + forget, and forget is its last rows.
    full = (run / "splits" / "full.json").read_text().splitlines()
    forget = (run / "splits" / "forget.json").read_text().splitlines()
    assert full[-len(forget) :] == forget
    assert "| ga |" in (run / "report.md").read_text()
    assert (run / "truth_ratios.png").stat().st_size > 0
    # GD was also evaluated during training: before, after each epoch; its last evaluation is the
    # exported model's, and the figure is drawn.
    history = json.loads((run / "history.json").read_text())
    assert list(history) == ["gd"] and [h["epoch"] for h in history["gd"]] == [0, 0, 1]
    for metric in ("forget_quality", "model_utility", "forget_Q_A_Prob"):
        assert history["gd"][-1][metric] == pytest.approx(saved["gd"]["metrics"][metric], rel=1e-4)
    assert history["gd"][0]["forget_Q_A_Prob"] == pytest.approx(
        saved["finetuned"]["metrics"]["forget_Q_A_Prob"], rel=1e-4
    )
    assert (run / "fq_vs_mu.png").stat().st_size > 0
    # The sequential stage: its row is the target with the fused adapter merged in, which is what
    # the callback evaluated (through hooks) after the last request.
    ledger = json.loads((run / "continual.json").read_text())["seq"]
    assert [(e["name"], e["status"]) for e in ledger] == [("request0", "done"), ("request1", "done")]
    last = ledger[-1]["metrics"]
    for metric in ("forget_quality", "model_utility", "forget_truth_ratio"):
        assert last[f"eval/{metric}"] == pytest.approx(saved["seq"]["metrics"][metric], rel=1e-4)
    assert saved["seq"]["metrics"]["forget_Q_A_Prob"] < saved["finetuned"]["metrics"]["forget_Q_A_Prob"]
    table = (run / "continual.md").read_text()
    assert "| before (0) |" in table and "| after request1 (2) |" in table
    assert table.count("| - |") == 1  # request1 has no forget quality after request0 only
    assert (run / "continual.png").stat().st_size > 0
    # The influence stage: its row is the target with the edited LoRA merged. Measured here on our
    # own: the edit raises the loss of the forget records over the fitted adapter's, by several times
    # more than it moves the retain records' (1.6e-3 against 4e-6 here).
    summary = json.loads((run / "models" / "infl" / "summary.json").read_text())
    assert summary["edit"] == "instance_removal" and summary["relative_residual"] < 1.0
    before = _split_losses(run, load_adapter(load_model(ModelSpec(path=str(run / "models" / "finetuned"))),
                                             str(run / "models" / "infl_adapter")))  # fmt: skip
    after = _split_losses(run, load_model(ModelSpec(path=str(run / "models" / "infl"))))
    assert after["forget"] - before["forget"] > 1e-3  # 1.6e-3 here; a wrong sign or a no-op fails
    assert after["forget"] - before["forget"] > 3 * abs(after["retain"] - before["retain"])


def test_protocol_deployed_adapter_influence_edits_the_targets_own_lora(tmp_path):
    """The deployed-adapter setting: the target and the retain model are LoRA fine-tunes of the
    base (kept apart and merged), and an InfluenceStep stage without adapter_fit edits the target's
    own LoRA: its row is the base with the edited LoRA merged. Without a LoRA fine-tune such a
    stage is refused in one line."""
    import torch
    from safetensors.torch import load_file

    lora = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    finetune = Stage(objective=FineTune(adapter=lora, optimizer=_adamw(3e-2)), max_epochs=8, batch_size=16)
    stage = Stage(objective=InfluenceStep(damping=0.05, max_iter=30), batch_size=32)
    _protocol(tmp_path, finetune=finetune, objectives={"infl": stage}).run()
    run = tmp_path / "runs" / "mini"
    models = run / "models"
    assert not (models / "infl_adapter").exists()  # no second adapter was fitted
    assert (models / "retain_adapter").is_dir()  # the retain model: the same recipe

    def weights(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(models / name / "model.safetensors"))

    base = load_model(ModelSpec(config=dict(TINY_LLAMA, hidden_size=64, intermediate_size=128),
                                tokenizer=str(run / "world" / "tokenizer")))  # fmt: skip
    merged = load_adapter(base, str(models / "finetuned_adapter")).merge_and_unload().state_dict()
    target, edited, base_weights = weights("finetuned"), weights("infl"), merged
    for key, value in target.items():  # the target is exactly the base with its adapter merged
        assert torch.allclose(value, base_weights[key], atol=1e-6), key
    adapted = [k for k in target if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert adapted and all(not torch.equal(edited[k], target[k]) for k in adapted)  # edited there ...
    assert all(torch.equal(edited[k], target[k]) for k in target if k not in adapted)  # ... only there
    # The edit removes the forget records: their loss rises over the target's, far more than the
    # retain records' moves.
    before = _split_losses(run, load_model(ModelSpec(path=str(models / "finetuned"))))
    after = _split_losses(run, load_model(ModelSpec(path=str(models / "infl"))))
    assert after["forget"] - before["forget"] > 3 * abs(after["retain"] - before["retain"]) > 0

    with pytest.raises(UserError, match="objectives.infl: an InfluenceStep stage edits a LoRA"):
        _protocol(tmp_path, objectives={"infl": stage})


def _split_losses(run, model) -> dict[str, float]:
    """Mean per-record answer NLL of the protocol's forget and retain splits under ``model``."""
    import torch

    from lightning_unlearn.data.collate import pad_batch
    from lightning_unlearn.data.datamodule import encode_records
    from lightning_unlearn.data.formatting import PLAIN
    from lightning_unlearn.data.tokenizer import load_tokenizer
    from lightning_unlearn.influence import per_example_loss

    tokenizer = load_tokenizer(str(run / "models" / "finetuned"))
    model.eval()
    losses = {}
    for split in ("forget", "retain"):
        records = [json.loads(line) for line in (run / "splits" / f"{split}.json").read_text().splitlines()]
        with torch.no_grad():
            batch = pad_batch(encode_records(records, tokenizer, PLAIN, 64), tokenizer.pad_token_id)
            losses[split] = per_example_loss(model, batch).mean().item()
    return losses


def test_protocol_bad_data_leaves_no_complete_looking_output(tmp_path):
    data = DataSettings(source=str(tmp_path / "missing_dir"))
    with pytest.raises(UserError, match="does not exist"):
        _protocol(tmp_path, data=data).run()
    assert not (tmp_path / "runs" / "mini" / "report.json").exists()
    with pytest.raises(UserError, match="reserved"):
        _protocol(tmp_path, objectives={"retain": Stage(objective=GradAscent())})


def test_protocol_trainer_strategy_is_built_fresh_for_every_stage(tmp_path):
    """A strategy given as class_path/init_args (how YAML names ModelParallelStrategy) becomes a new
    instance per stage's Trainer, with its arguments; a wrong one is one clear line."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    spec = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1},
    }
    protocol = _protocol(tmp_path, trainer={"strategy": spec, "enable_progress_bar": False})
    built = [protocol._trainer(n, protocol.finetune).strategy for n in ("retain", "finetuned")]
    assert all(isinstance(s, ModelParallelStrategy) for s in built) and built[0] is not built[1]
    assert [s._data_parallel_size for s in built] == [1, 1]
    assert protocol.trainer_args["strategy"] == spec  # the spec is kept, not replaced by an object
    for bad, message in [
        ({"class_path": "lightning.pytorch.strategies.NoSuchStrategy"}, "has no attribute 'NoSuchStrategy'"),
        ({**spec, "init_args": {"data_parallel": 1}}, "Option 'data_parallel' is not accepted"),
        ({"init_args": {}}, "is none of the accepted"),
    ]:  # refused by fit's Trainer parser as the protocol is built, before anything trains
        with pytest.raises(UserError, match=f"^protocol: trainer.strategy: .*{message}"):
            _protocol(tmp_path, trainer={"strategy": bad})


def test_protocol_models_from_reuses_another_runs_target(tmp_path, monkeypatch):
    """A protocol with ``models_from`` fits only its objectives: the target and retain model (and
    their reports) are the earlier run's; a run of other fine-tune settings is refused in one line
    before anything is written."""

    def finetune(epochs: int) -> Stage:
        return Stage(objective=FineTune(optimizer=_adamw(3e-3)), max_epochs=epochs, batch_size=16)

    ga = {"ga": Stage(objective=GradAscent(optimizer=_adamw(1e-3)), max_epochs=1, batch_size=4)}
    first = _protocol(tmp_path, objectives=ga, finetune=finetune(2))
    before = first.run()
    fitted = record_fits(monkeypatch)
    gd = {"gd": Stage(objective=GradDiff(optimizer=_adamw(1e-3)), max_epochs=1, batch_size=4)}
    second = _protocol(
        tmp_path, name="second", objectives=gd, finetune=finetune(2), models_from=str(first.run_dir)
    )
    after = second.run()
    assert fitted == ["GradDiff"]
    for model in ("finetuned", "retain"):
        assert after[model].metrics == before[model].metrics
    assert (second.run_dir / "models" / "finetuned").resolve() == (
        first.run_dir / "models" / "finetuned"
    ).resolve()

    third = _protocol(
        tmp_path, name="third", objectives=gd, finetune=finetune(3), models_from=str(first.run_dir)
    )
    with pytest.raises(UserError, match="models_from: .*mini was made with other model, fine-tune"):
        third.run()
    assert not third.run_dir.exists()


def test_an_objective_added_to_a_finished_run_is_the_only_one_trained(tmp_path, monkeypatch):
    """Each objective is fingerprinted on its own: adding one to a finished run fits only it and
    keeps the others' reports; changing one that already ran is refused in one line, with nothing
    written, while the run's other settings are unchanged."""
    finetune = Stage(objective=FineTune(optimizer=_adamw(3e-3)), max_epochs=2, batch_size=16)

    def ga(lr: float) -> Stage:
        return Stage(objective=GradAscent(optimizer=_adamw(lr)), max_epochs=1, batch_size=4)

    gd = Stage(objective=GradDiff(optimizer=_adamw(1e-3)), max_epochs=1, batch_size=4)
    before = _protocol(tmp_path, objectives={"ga": ga(1e-3)}, finetune=finetune).run()
    fitted = record_fits(monkeypatch)
    grown = _protocol(tmp_path, objectives={"ga": ga(1e-3), "gd": gd}, finetune=finetune)
    after = grown.run()
    assert fitted == ["GradDiff"]
    assert after["ga"].metrics == before["ga"].metrics
    assert set(after) == {"finetuned", "retain", "ga", "gd"}
    assert sorted(p.name for p in (grown.run_dir / "stages").iterdir()) == [
        "ga.fingerprint",
        "gd.fingerprint",
    ]

    files = {p: p.read_bytes() for p in grown.run_dir.rglob("*") if p.is_file()}
    changed = _protocol(tmp_path, objectives={"ga": ga(2e-3), "gd": gd}, finetune=finetune)
    with pytest.raises(UserError, match=r"mini: objective 'ga' ran there with other settings"):
        changed.run()
    assert fitted == ["GradDiff"]
    assert {p: p.read_bytes() for p in grown.run_dir.rglob("*") if p.is_file()} == files
