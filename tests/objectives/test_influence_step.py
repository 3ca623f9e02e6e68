"""InfluenceStep (LLMEraser) as a LightningModule: run by ``Trainer.fit`` and the
CLI on a tiny Llama whose rank-1 LoRA (q_proj, v_proj: 128 parameters) was fine-tuned on 16 records.

As in tests/test_influence.py, the base is first trained on other records (so it is not a random
network) and saved; the adapter is then fitted by L-BFGS to a stationary point of
L(theta) + (DAMPING / 2) ||theta||^2 over the 16 records and saved in peft format, so damping =
DAMPING makes the step the Newton step of the penalised fine-tuning loss.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from helpers import fit_lbfgs
from lightning.pytorch.loggers import CSVLogger

from lightning_unlearn.data.collate import pad_batch
from lightning_unlearn.data.edits import InfluenceDataModule
from lightning_unlearn.data.formatting import PromptFormat, encode
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.influence import Edit, influence_delta, per_example_loss, trainable_parameters
from lightning_unlearn.models import LoraSpec, ModelSpec, attach_lora, load_adapter, load_model
from lightning_unlearn.objectives import InfluenceStep

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "influence"
DAMPING = 1.0  # the fine-tuning L2 penalty, and the damping of every step
N_TRAIN = 16
REMOVED = [0, 5]  # rows of the training set removed
EDITED, DONORS = [2, 9], [40, 41]  # rows given a new answer, and held-out records lending it
LORA = LoraSpec(r=1, alpha=2, target_modules=["q_proj", "v_proj"])
SOLVER = {"damping": DAMPING, "method": "cg", "tol": 1e-6, "max_iter": 200}


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Fitted:
    spec: ModelSpec  # the saved base model
    adapter_dir: Path  # theta_hat, fine-tuned on source/full.json
    source: Path  # TOFU layout: full (the 16 records), forget10 (2 of them)
    answers: Path  # edits file: response correction of rows EDITED
    questions: Path  # edits file: query modification of rows EDITED
    records: list[dict]
    tokenizer: object


def _batches(records: list[dict], tokenizer, size: int = 4) -> list[dict]:
    features = [encode(r["question"], r["answer"], tokenizer, PromptFormat(), 64) for r in records]
    return [pad_batch(features[i : i + size], tokenizer.pad_token_id) for i in range(0, len(features), size)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, world_dir, tokenizer_dir) -> Fitted:
    root = tmp_path_factory.mktemp("influence_step")
    tokenizer = load_tokenizer(tokenizer_dir)
    records = load_split(str(world_dir), "retain90")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir), tokenizer)
        [rest] = _batches(records[N_TRAIN:], tokenizer, size=len(records))
        optimizer = torch.optim.Adam(base.parameters(), lr=1e-2)
        for _ in range(60):
            optimizer.zero_grad()
            per_example_loss(base, rest).mean().backward()
            optimizer.step()
        base.save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")  # the base directory is a complete model
        model = attach_lora(base, LORA)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0: a degenerate point for the Hessian
                with torch.no_grad():
                    p.normal_(0, 0.1)
    params = [p for _, p in trainable_parameters(model)]
    batches = _batches(records[:N_TRAIN], tokenizer)
    grad_norm = fit_lbfgs(model, params, batches, N_TRAIN, DAMPING, max_iter=200)
    print(f"\nadapter fit: grad norm {grad_norm:.1e}")
    assert grad_norm < 1e-3
    model.save_pretrained(root / "adapter")
    source = root / "source"
    source.mkdir()
    _write_jsonl(source / "full.json", records[:N_TRAIN])
    _write_jsonl(source / "forget10.json", [records[i] for i in REMOVED])
    pairs = list(zip(EDITED, DONORS, strict=True))
    answers = _write_jsonl(
        root / "answers.jsonl", [dict(records[i], new_answer=records[d]["answer"]) for i, d in pairs]
    )
    questions = _write_jsonl(
        root / "questions.jsonl", [dict(records[i], new_question=records[d]["question"]) for i, d in pairs]
    )
    spec = ModelSpec(path=str(root / "base"))
    return Fitted(spec, root / "adapter", source, answers, questions, records, tokenizer)


def _data(f: Fitted, **kwargs) -> InfluenceDataModule:
    kwargs = kwargs or {"removed_split": "forget10"}
    return InfluenceDataModule(
        tokenizer=f.spec.path, source=str(f.source), train_split="full", max_length=64, batch_size=4, **kwargs
    )


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    args = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_checkpointing": False,
            "enable_model_summary": False, "logger": CSVLogger(tmp_path / "logs", version=0), **kwargs}  # fmt: skip
    return L.Trainer(**args)


def _theta_hat(f: Fitted) -> torch.nn.Module:
    return load_adapter(load_model(f.spec), str(f.adapter_dir), trainable=True)


def _adapter(f: Fitted, directory: Path) -> dict[str, torch.Tensor]:
    model = load_adapter(load_model(f.spec), str(directory), trainable=True)
    return {n: p.detach().clone() for n, p in trainable_parameters(model)}


def _per_example(model, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([per_example_loss(model, b) for b in batches])


def test_instance_removal_through_trainer_fit(fitted, tmp_path):
    f = fitted
    step = InfluenceStep(model=f.spec, adapter_dir=str(f.adapter_dir), edit="instance_removal",
                         out_dir=str(tmp_path / "out"), **SOLVER)  # fmt: skip
    data = _data(f)
    _trainer(tmp_path).fit(step, datamodule=data)

    # The same solve called directly, on the data module's own batches.
    model = _theta_hat(f)
    before = {n: p.detach().clone() for n, p in trainable_parameters(model)}
    shard = data.shard()
    v, result = influence_delta(model, shard["train"], Edit("instance_removal", **shard["edit"]), N_TRAIN,
                                DAMPING, "cg", tol=1e-6, max_iter=200)  # fmt: skip
    saved = _adapter(f, tmp_path / "out")
    assert saved.keys() == v.keys()
    for name, delta in v.items():
        torch.testing.assert_close(saved[name], before[name] + delta, rtol=1e-6, atol=1e-6)

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    v_norm = torch.cat([d.flatten() for d in v.values()]).norm().item()
    print(f"\nremoval: {summary['iterations']} cg iterations, residual {summary['relative_residual']:.2e}, "
          f"|v| {summary['v_norm']:.4f}, {summary['wall_time_s']:.2f} s")  # fmt: skip
    assert summary["edit"] == "instance_removal" and summary["method"] == "cg"
    assert summary["n_train"] == N_TRAIN and summary["n_edited"] == len(REMOVED)
    assert summary["iterations"] == result.iterations > 0 and summary["relative_residual"] < 1e-4
    assert summary["v_norm"] == pytest.approx(v_norm, rel=1e-5) and summary["damping"] == DAMPING

    # Every solver iteration reached the logger.
    rows = list(csv.DictReader((tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").open()))
    residuals = [
        float(r["influence/relative_residual"]) for r in rows if r.get("influence/relative_residual")
    ]
    assert len(residuals) == result.iterations and residuals[-1] <= 1e-6

    # The edited adapter forgets the removed rows and keeps the rest.
    batches = _batches(f.records[:N_TRAIN], f.tokenizer)
    old = _per_example(_theta_hat(f), batches)
    new = _per_example(load_adapter(load_model(f.spec), str(tmp_path / "out")), batches)
    keep = [i for i in range(N_TRAIN) if i not in REMOVED]
    rise = (new[REMOVED] - old[REMOVED]).mean().item()
    drift = (new[keep] - old[keep]).mean().item()
    print(f"loss on removed {old[REMOVED].mean():.4f} -> {new[REMOVED].mean():.4f}; "
          f"on the rest {old[keep].mean():.4f} -> {new[keep].mean():.4f}")  # fmt: skip
    assert rise > 0.05 and abs(drift) < 0.2 * rise

    # What the protocol calls: the merged model, a plain HF directory, scores like base + adapter.
    merged = load_model(ModelSpec(path=str(step.export(tmp_path / "merged"))))
    torch.testing.assert_close(_per_example(merged, batches), new, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "summary.json").is_file()


def _edited(f: Fitted, field: str) -> tuple[list[dict], list[dict]]:
    old = [f.records[i] for i in EDITED]
    new = [dict(r, **{field: f.records[d][field]}) for r, d in zip(old, DONORS, strict=True)]
    return _batches(old, f.tokenizer), _batches(new, f.tokenizer)


def _moves(f: Fitted, directory: Path, field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss change (edited minus theta_hat) on the old and on the new records."""
    old, new = _edited(f, field)
    before, after = _theta_hat(f), load_adapter(load_model(f.spec), str(directory))
    return (
        _per_example(after, old) - _per_example(before, old),
        _per_example(after, new) - _per_example(before, new),
    )


def _overrides(f: Fitted, tmp_path: Path) -> list[str]:
    return [
        f"--model.init_args.model.path={f.spec.path}",
        f"--model.init_args.adapter_dir={f.adapter_dir}",
        f"--model.init_args.out_dir={tmp_path / 'out'}",
        f"--model.init_args.damping={DAMPING}",
        "--model.init_args.tol=1e-6",
        "--model.init_args.max_iter=200",
        f"--data.init_args.tokenizer={f.spec.path}",
        f"--data.init_args.source={f.source}",
        "--data.init_args.max_length=64",
        "--data.init_args.batch_size=4",
        "--trainer.accelerator=cpu",
    ]


def _edits_override(f: Fitted, kind: str) -> list[str]:
    files = {"query_modification": f.questions, "response_correction": f.answers}
    return [f"--data.init_args.edits_file={files[kind]}"] if kind in files else []


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_influence_config_builds_and_loads(fitted, tmp_path, config):
    from lightning_unlearn.cli import lightning_main

    spec = yaml.safe_load(config.read_text())
    argv = ["--config", str(config), "--trainer.logger=false", *_overrides(fitted, tmp_path)]
    cli = lightning_main(argv + _edits_override(fitted, config.stem), run=False)
    model, data = cli.model, cli.datamodule
    assert isinstance(model, InfluenceStep) and isinstance(data, InfluenceDataModule)
    assert model.edit_kind == data.edit == config.stem == spec["data"]["init_args"]["edit"]
    assert model.method == spec["model"]["init_args"]["method"] and model.damping == DAMPING
    data.setup("fit")
    model.configure_model()
    assert data.n_train == N_TRAIN and len(data.edited_ids) == 2
    assert sum(p.numel() for _, p in trainable_parameters(model.model)) == 128


def test_response_correction_through_the_cli(fitted, tmp_path, monkeypatch):
    from lightning_unlearn.cli import lightning_main

    monkeypatch.chdir(tmp_path)  # the CLI's default logger writes runs/ here
    config = CONFIGS / "response_correction.yaml"
    lightning_main(["fit", "--config", str(config), *_overrides(fitted, tmp_path),
                    *_edits_override(fitted, "response_correction")])  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    old, new = _moves(fitted, tmp_path / "out", "answer")
    print(f"\nresponse correction via CLI: {summary['iterations']} cg iterations, residual "
          f"{summary['relative_residual']:.2e}; loss change on old answers {old.tolist()}, new {new.tolist()}")  # fmt: skip
    assert summary["edit"] == "response_correction" and summary["n_edited"] == 2
    assert summary["relative_residual"] < 1e-4 and summary["iterations"] > 0
    assert (new < -0.2).all() and old.mean() > 0.2
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_query_modification_exact_through_trainer_fit(fitted, tmp_path):
    step = InfluenceStep(model=fitted.spec, adapter_dir=str(fitted.adapter_dir), damping=DAMPING,
                         method="exact", out_dir=str(tmp_path / "out"))  # fmt: skip
    _trainer(tmp_path, enable_progress_bar=False).fit(
        step, datamodule=_data(fitted, edits_file=str(fitted.questions))
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    old, new = _moves(fitted, tmp_path / "out", "question")
    print(f"\nquery modification (exact): residual {summary['relative_residual']:.2e}; "
          f"loss change on old queries {old.tolist()}, new {new.tolist()}")  # fmt: skip
    assert summary["edit"] == "query_modification" and summary["iterations"] == 128
    assert summary["relative_residual"] < 1e-4
    assert (new < -0.2).all()


def test_bad_edits_are_user_errors_naming_row_and_field(fitted, tmp_path, capsys):
    f = fitted
    good = [json.loads(line) for line in f.answers.read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [good[0], {k: v for k, v in good[1].items() if k != "new_answer"}])
    with pytest.raises(UserError, match=r"bad.jsonl: row 2: missing field 'new_answer'"):
        _data(f, edit="response_correction", edits_file=str(bad)).setup("fit")
    _write_jsonl(bad, [dict(good[0], new_answer=" ")])
    with pytest.raises(UserError, match=r"row 1: field 'new_answer' must be a non-empty string"):
        _data(f, edit="response_correction", edits_file=str(bad)).setup("fit")
    _write_jsonl(bad, [good[0], dict(good[1], answer="not what it was trained on")])
    with pytest.raises(UserError, match=r"row 2: the record to edit is not in the training data"):
        _data(f, edits_file=str(bad)).setup("fit")
    _write_jsonl(bad, [good[0], good[0]])
    with pytest.raises(UserError, match=r"row 2: edits the same training record as row 1"):
        _data(f, edits_file=str(bad)).setup("fit")
    _write_jsonl(bad, [f.records[0], f.records[N_TRAIN]])  # the second was never trained on
    with pytest.raises(UserError, match=f"record {f.records[N_TRAIN]['id']} is not in the training data"):
        _data(f, removed_file=str(bad)).setup("fit")
    with pytest.raises(UserError, match="exactly one of"):
        _data(f, removed_split="forget10", edits_file=str(f.answers))
    with pytest.raises(UserError, match="unknown option"):
        InfluenceStep(method="exact", tol=1e-3)
    with pytest.raises(UserError, match="on_step is set by InfluenceStep"):
        InfluenceStep(solver_options={"on_step": print})
    with pytest.raises(UserError, match="configured for edit 'instance_removal' but the data holds"):
        InfluenceStep(edit="instance_removal").training_step({"kind": "response_correction"}, 0)

    # Through the command line: one line on stderr, exit status 2, nothing written.
    from lightning_unlearn.cli import main

    _write_jsonl(bad, [good[0], {k: v for k, v in good[1].items() if k != "new_answer"}])
    argv = ["fit", "--config", str(CONFIGS / "response_correction.yaml"), *_overrides(f, tmp_path),
            f"--data.init_args.edits_file={bad}", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "row 2: missing field 'new_answer'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_two_ddp_spawn_processes_save_the_one_process_adapter(fitted, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by the spawned workers' torch
    adapters, summaries = {}, {}
    for devices, strategy in [(1, "auto"), (2, "ddp_spawn")]:
        out = tmp_path / f"out{devices}"
        step = InfluenceStep(
            model=fitted.spec, adapter_dir=str(fitted.adapter_dir), out_dir=str(out), **SOLVER
        )
        trainer = _trainer(
            tmp_path / str(devices), devices=devices, strategy=strategy, enable_progress_bar=False
        )
        trainer.fit(step, datamodule=_data(fitted))
        adapters[devices] = _adapter(fitted, out)
        summaries[devices] = json.loads((out / "summary.json").read_text())
    errors = []
    for name, one in adapters[1].items():
        torch.testing.assert_close(adapters[2][name], one, rtol=1e-5, atol=1e-5)
        errors.append((adapters[2][name] - one).abs().max().item())
    one, two = summaries[1], summaries[2]
    print(f"\n2 processes vs 1: max |d theta| {max(errors):.1e}; cg iterations {two['iterations']} vs "
          f"{one['iterations']}, |v| {two['v_norm']:.6f} vs {one['v_norm']:.6f}")  # fmt: skip
    assert two["world_size"] == 2 and two["n_train"] == one["n_train"] == N_TRAIN
    assert abs(two["iterations"] - one["iterations"]) <= 1


def test_stochastic_through_trainer_fit_agrees_with_cg(fitted, tmp_path):
    step = InfluenceStep(model=fitted.spec, adapter_dir=str(fitted.adapter_dir), damping=DAMPING,
                         method="stochastic", max_iter=600, solver_options={"seed": 0},
                         out_dir=str(tmp_path / "out"))  # fmt: skip
    data = _data(fitted)
    _trainer(tmp_path, enable_progress_bar=False).fit(step, datamodule=data)
    model = _theta_hat(fitted)
    before = {n: p.detach().clone() for n, p in trainable_parameters(model)}
    shard = data.shard()
    v, _ = influence_delta(model, shard["train"], Edit("instance_removal", **shard["edit"]), N_TRAIN,
                           DAMPING, "cg", tol=1e-6, max_iter=200)  # fmt: skip
    saved = _adapter(fitted, tmp_path / "out")
    moved = torch.cat([(saved[n] - before[n]).flatten() for n in v])
    want = torch.cat([d.flatten() for d in v.values()])
    cosine = torch.nn.functional.cosine_similarity(moved, want, dim=0).item()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    print(f"\nstochastic (600 iterations, 4 mini-batches): cosine with cg {cosine:.5f}, "
          f"|v| / |v_cg| {(moved.norm() / want.norm()).item():.4f}, residual {summary['relative_residual']:.2e}")  # fmt: skip
    assert summary["iterations"] == 600 and summary["options"] == {"max_iter": 600, "seed": 0}
    assert cosine > 0.99


def test_kfac_through_trainer_fit_saves_the_direct_delta(fitted, tmp_path):
    # The layer-wise path through the LightningModule: same v as influence_delta called directly,
    # one pass reported, no residual unless asked for (None in summary.json, not NaN).
    step = InfluenceStep(model=fitted.spec, adapter_dir=str(fitted.adapter_dir), damping=DAMPING,
                         method="ekfac", solver_options={"mc_samples": 2}, out_dir=str(tmp_path / "out"))  # fmt: skip
    data = _data(fitted)
    _trainer(tmp_path, enable_progress_bar=False).fit(step, datamodule=data)
    model = _theta_hat(fitted)
    before = {n: p.detach().clone() for n, p in trainable_parameters(model)}
    shard = data.shard()
    v, result = influence_delta(model, shard["train"], Edit("instance_removal", **shard["edit"]), N_TRAIN,
                                DAMPING, "ekfac", mc_samples=2, residual=True)  # fmt: skip
    saved = _adapter(fitted, tmp_path / "out")
    for name, delta in v.items():
        torch.testing.assert_close(saved[name] - before[name], delta, rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    print(f"\nekfac through Trainer.fit: residual (asked for directly) {result.relative_residual:.3f}")
    assert (
        summary["method"] == "ekfac" and summary["iterations"] == 2 and summary["relative_residual"] is None
    )
    # An approximation, and a long one: ||(H + lambda I) v - b|| / ||b|| was 5.3 here (v = 0 scores 1),
    # since the layer-wise curvature is too small along b; the direction is what it gets right.
    assert 0.5 < result.relative_residual < 20
