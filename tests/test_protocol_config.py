"""One config dialect: a protocol stage that names a fit config builds what ``fit`` builds from it
and trains what the same stage written inline trains; bad keys are one line naming file and key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY_LLAMA
from test_cli import run_cli

from lightning_unlearn.errors import UserError
from lightning_unlearn.protocol_config import protocol_from_config
from lightning_unlearn.resume import describe

ROOT = Path(__file__).parents[1]
TOFU = ROOT / "configs" / "tofu"
SHARED = ("base.yaml", "data.yaml", "target.yaml")
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def _settings(objective) -> dict:
    """An objective's settings: its public attributes (``describe``), the optimiser as its class
    and keyword arguments (jsonargparse's factory also holds the parser that built it, and a
    ``params: None`` placeholder where the spec was read without its defaults)."""
    settings = describe(objective)
    factory = objective.optimizer_factory
    keywords = {k: v for k, v in factory.keywords.items() if not (k == "params" and v is None)}
    settings["optimizer_factory"] = (factory.args[-1], keywords)
    return settings


@pytest.mark.parametrize(
    "config", sorted(p for p in TOFU.glob("*.yaml") if p.name not in SHARED), ids=lambda p: p.stem
)
def test_a_stage_from_a_tofu_config_builds_what_fit_builds(config, monkeypatch):
    """``objectives: {x: {config: configs/tofu/x.yaml}}`` gives the objective of ``lightning-unlearn
    fit --config configs/tofu/x.yaml`` (class and every setting), its epochs, Trainer settings
    and batch size; the model is the protocol's (fit's is target.yaml), ExportModel is left out."""
    from lightning_unlearn.cli import lightning_main

    monkeypatch.chdir(ROOT)
    relative = str(config.relative_to(ROOT))
    protocol = protocol_from_config({**DEMO, "objectives": {"x": {"config": relative}}}, "demo.yaml")
    stage = protocol.objectives["x"]
    cli = lightning_main(["--config", relative, "--trainer.logger=false"], run=False)
    assert type(stage.objective) is type(cli.model)
    assert _settings(stage.objective) == _settings(cli.model)
    assert cli.model.model_spec.path == "runs/smollm2_tofu/models/finetuned"
    assert stage.objective.model_spec is None  # the protocol sets it to its target
    trainer = cli.config.trainer
    assert stage.max_epochs == trainer.max_epochs == (10 if config.stem == "undial" else 5)
    assert stage.trainer == {
        "accelerator": trainer.accelerator,
        "devices": trainer.devices,
        "precision": trainer.precision,
        "log_every_n_steps": trainer.log_every_n_steps,
    }
    assert [type(c).__name__ for c in cli.trainer.callbacks if type(c).__name__ == "ExportModel"]
    assert stage.batch_size == cli.datamodule.batch_size == 4


def test_the_entry_overrides_the_fit_config(monkeypatch):
    """The entry's own keys win, mapping by mapping: the fit config's other settings stay; an
    objective of another class replaces the file's objective whole."""
    monkeypatch.chdir(ROOT)
    npo = {"config": "configs/tofu/npo.yaml", "max_epochs": 2, "trainer": {"precision": "32-true"}}
    objectives = {
        "beta": {**npo, "objective": {"init_args": {"beta": 0.3}}},
        "ga": {**npo, "objective": {"class_path": "lightning_unlearn.objectives.GradAscent"}},
    }
    stages = protocol_from_config({**DEMO, "objectives": objectives}, "demo.yaml").objectives
    beta = stages["beta"]
    assert (beta.objective.beta, beta.max_epochs, beta.batch_size) == (0.3, 2, 4)
    assert beta.objective.optimizer_factory.keywords["lr"] == 1e-5  # from npo.yaml
    assert beta.objective.adapter_spec.r == 8
    assert beta.trainer == {
        "accelerator": "auto",
        "devices": 1,
        "precision": "32-true",
        "log_every_n_steps": 5,
    }
    assert (
        type(stages["ga"].objective).__name__ == "GradAscent" and stages["ga"].objective.adapter_spec is None
    )


def _fit_file(tmp_path: Path, **extra) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "enable_progress_bar": False},
        "model": {
            "class_path": "lightning_unlearn.objectives.GradDiff",
            "init_args": {
                "model": {"config": TINY_LLAMA},
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-3}},
            },
        },
        "data": {
            "class_path": "lightning_unlearn.data.datamodule.UnlearningDataModule",
            "init_args": {"tokenizer": "t", "source": "s", "batch_size": 4, "retain_per_forget": 2},
        },
        **extra,
    }
    path = tmp_path / "gd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"seed_everything": 1}, "seed_everything: 1, but the protocol seeds every stage with its seed 0"),
        ({"trainer": {"logger": False}}, "trainer.logger: the protocol logs every stage itself"),
        (
            {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}},
            "optimizer: a protocol stage",
        ),
        ({"trainer": {"max_epoch": 2}}, "trainer.max_epoch"),  # fit's own parser refuses it
    ],
)
def test_a_fit_config_key_the_stage_cannot_honour_is_refused(tmp_path, extra, says):
    path = _fit_file(tmp_path, **extra)
    with pytest.raises(UserError) as err:
        protocol_from_config({**DEMO, "objectives": {"gd": {"config": str(path)}}}, "demo.yaml")
    message = str(err.value)
    assert message.startswith(f"demo.yaml: {path}: ") and says in message and "\n" not in message


def test_bad_protocol_keys_name_file_and_key(tmp_path):
    cases = [
        ({"objectives": {"ga": {"max_epoch": 2}}}, "objectives.ga: max_epoch: no such setting"),
        ({"objectives": {"ga": {"trainer": {"max_epochs": 2}}}}, "objectives.ga: trainer.max_epochs: set by"),
        ({"objectives": {"ga": {"config": "missing.yaml"}}}, "objectives.ga.config: 'missing.yaml' is not"),
        ({"trainer": {"gradient_clip_vall": 1.0}}, "trainer.gradient_clip_vall: no such setting"),
        ({"data": {**DEMO["data"], "max_lenght": 3}}, "data: Option 'max_lenght' is not accepted"),
    ]
    for change, says in cases:
        with pytest.raises(UserError) as err:
            protocol_from_config({**DEMO, **change}, "demo.yaml")
        assert str(err.value).startswith("demo.yaml: ") and says in str(err.value), str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**DEMO, "objectives": {"ga": {"max_epoch": 2}}}))
    result = run_cli("protocol", "--config", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"lightning-unlearn: error: {bad}: objectives.ga: max_epoch: no such setting"
    ]


def test_a_stage_from_a_fit_config_trains_what_the_inline_stage_trains(tmp_path):
    """Two stages of one tiny protocol, one naming a fit config and one written inline with the
    same settings, unlearn the same target to the same report."""
    fit = _fit_file(tmp_path)
    inline = {
        "objective": {
            "class_path": "lightning_unlearn.objectives.GradDiff",
            "init_args": {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-3}}},
        },
        "max_epochs": 2,
        "batch_size": 4,
        "retain_per_forget": 2,
        "trainer": {"enable_progress_bar": False},
    }
    config = {
        "name": "dialect",
        "out_dir": str(tmp_path / "runs"),
        "model": {"config": TINY_LLAMA},
        "data": {
            "world": {
                "seed": 1,
                "n_authors": 10,
                "n_forget_authors": 1,
                "n_world_facts": 6,
                "n_eval_retain_authors": 2,
            },
            "eval_splits": {"forget": "forget10_perturbed", "retain": "retain_perturbed"},
            "eval_limit": 8,
            "max_length": 64,
        },
        "finetune": {**inline, "objective": {"class_path": "lightning_unlearn.objectives.FineTune"}},
        "objectives": {"inline": inline, "from_fit": {"config": str(fit)}},
        "evaluation": {"batch_size": 16, "max_new_tokens": 4},
        "trainer": {"enable_progress_bar": False},
    }
    protocol = protocol_from_config(config, "tiny")
    inline_stage, from_fit = protocol.objectives["inline"], protocol.objectives["from_fit"]
    assert _settings(inline_stage.objective) == _settings(from_fit.objective)
    assert dataclasses.replace(inline_stage, objective=None) == dataclasses.replace(from_fit, objective=None)
    protocol.run()
    saved = json.loads((tmp_path / "runs" / "dialect" / "report.json").read_text())
    assert saved["from_fit"]["metrics"]["forget_Q_A_Prob"] != saved["finetuned"]["metrics"]["forget_Q_A_Prob"]
    assert saved["from_fit"]["metrics"] == saved["inline"]["metrics"]
    assert saved["from_fit"]["per_sample"] == saved["inline"]["per_sample"]
