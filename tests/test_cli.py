"""The console entry point as a user runs it: help, print_config, a 2-step fit, and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from transformers import AutoModelForCausalLM

from lightning_unlearn.models import ModelSpec, load_model


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_unlearn", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def fit_config(tmp_path: Path, world_dir: Path, **data_overrides) -> Path:
    tokenizer = str(world_dir / "tokenizer")
    data = {
        "tokenizer": tokenizer,
        "source": str(world_dir),
        "forget_split": "forget10",
        "retain_split": "retain90",
        "max_length": 64,
        "batch_size": 2,
        **data_overrides,
    }
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 2,
            "accelerator": "cpu",
            "log_every_n_steps": 1,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "version": 0},
            },
            "callbacks": [
                {
                    "class_path": "lightning_unlearn.callbacks.ExportModel",
                    "init_args": {"dirpath": str(tmp_path / "out")},
                }
            ],
        },
        "model": {
            "class_path": "lightning_unlearn.objectives.GradDiff",
            "init_args": {
                "model": {"config": TINY_LLAMA, "tokenizer": tokenizer},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            },
        },
        "data": {"class_path": "lightning_unlearn.data.datamodule.UnlearningDataModule", "init_args": data},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_help_lists_subcommands():
    top = run_cli("--help")
    assert top.returncode == 0 and "protocol" in top.stdout and "fit" in top.stdout
    fit = run_cli("fit", "--help")
    assert fit.returncode == 0 and "--print_config" in fit.stdout and "--model" in fit.stdout
    protocol = run_cli("protocol", "--help")
    assert protocol.returncode == 0 and "--objectives" in protocol.stdout
    evaluate = run_cli("evaluate", "--help")
    assert (
        evaluate.returncode == 0 and "--adapter" in evaluate.stdout and "--retain_report" in evaluate.stdout
    )
    missing = run_cli("evaluate", "--model", "/nonexistent/model", "--source", "/nonexistent/tofu")
    assert (
        missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    )


TOFU_CONFIGS = Path(__file__).parents[1] / "configs" / "tofu"
SHARED = ("base.yaml", "data.yaml", "target.yaml")  # read by every objective's file


@pytest.mark.parametrize(
    "config", sorted(p for p in TOFU_CONFIGS.glob("*.yaml") if p.name not in SHARED), ids=lambda p: p.stem
)
def test_every_tofu_config_builds_its_objective(config):
    """Each objective's file builds its objective with its own settings, the model of target.yaml and
    the data module of data.yaml (through base.yaml); IDK objectives get the built-in refusals, the
    others none."""
    from lightning_unlearn.cli import lightning_main

    spec = yaml.safe_load(config.read_text())
    assert spec["model"]["init_args"]["model"] == "target.yaml" and spec["config"] == "base.yaml"
    assert yaml.safe_load((TOFU_CONFIGS / "base.yaml").read_text())["data"] == "data.yaml"
    target = yaml.safe_load((TOFU_CONFIGS / "target.yaml").read_text())
    data = yaml.safe_load((TOFU_CONFIGS / "data.yaml").read_text())
    cli = lightning_main(["--config", str(config), "--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == spec["model"]["class_path"].rsplit(".", 1)[1]
    for key, value in spec["model"]["init_args"].items():
        if key not in ("model", "adapter", "optimizer"):
            assert getattr(cli.model, key) == value, key
    assert cli.model.model_spec.path == target["path"]
    assert type(cli.datamodule).__name__ == data["class_path"].rsplit(".", 1)[1]
    assert (cli.datamodule.source, cli.datamodule.forget_split) == (
        data["init_args"]["source"],
        data["init_args"]["forget_split"],
    )
    assert cli.datamodule.refusals == ("builtin" if cli.model.needs_refusals else None)


def test_idk_objectives_get_builtin_refusals_unless_the_data_names_a_file(tmp_path):
    from lightning_unlearn.cli import lightning_main

    refusals = tmp_path / "refusals.txt"
    refusals.write_text("I cannot say.\n")
    argv = ["--config", str(TOFU_CONFIGS / "idk_ap.yaml"), "--trainer.logger=false"]
    assert lightning_main(argv, run=False).datamodule.refusals == "builtin"
    cli = lightning_main([*argv, "--data.init_args.refusals", str(refusals)], run=False)
    assert cli.datamodule.refusals == str(refusals)


PROTOCOL_CONFIGS = sorted(
    p
    for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
    if not p.stem.startswith(("wmdp", "muse"))
)  # wmdp_demo.yaml and muse_demo.yaml name other benchmarks: test_benchmarks.py builds them


OVERLAYS = {"smollm2_recipes.yaml": "smollm2_tofu.yaml"}


@pytest.mark.parametrize("config", PROTOCOL_CONFIGS, ids=lambda p: p.stem)
def test_every_protocol_config_builds(config):
    """Each shipped protocol config parses and builds every stage's objective (nothing runs)."""
    from lightning_unlearn.cli import build_protocol

    base = OVERLAYS.get(config.name)  # read on top of another protocol config, as its comment says
    protocol = build_protocol(
        [*(["--config", str(config.parent / base)] if base else []), "--config", str(config)]
    )
    spec = yaml.safe_load(config.read_text())
    assert list(protocol.objectives) == list(spec["objectives"])
    for name, stage in protocol.objectives.items():
        assert (
            type(stage.objective).__name__
            == spec["objectives"][name]["objective"]["class_path"].split(".")[-1]
        )


def test_print_config_resolves_objective_and_data(tmp_path, world_dir):
    result = run_cli("fit", "--config", str(fit_config(tmp_path, world_dir)), "--print_config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["class_path"] == "lightning_unlearn.objectives.GradDiff"
    assert printed["model"]["init_args"]["retain_loss_type"] == "nll"
    assert printed["data"]["init_args"]["prompt_format"]["label_boundary"] == "offsets"


def test_two_step_fit_trains_logs_and_exports(tmp_path, world_dir):
    result = run_cli("fit", "--config", str(fit_config(tmp_path, world_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").open()))
    assert sorted({int(r["step"]) for r in rows if r.get("train/forget_loss")}) == [0, 1]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    initial = load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=str(world_dir / "tokenizer")))
    changed = [n for n, p in initial.state_dict().items() if not torch.equal(p, exported.state_dict()[n])]
    assert changed, "two SGD steps at lr 0.5 must change the weights"
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def _assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


@pytest.fixture
def bad_source(tmp_path, world_dir) -> Path:
    """A copy of the world whose forget split has an empty answer on row 3."""
    source = tmp_path / "bad_world"
    source.mkdir()
    for path in world_dir.glob("*.json"):
        (source / path.name).write_text(path.read_text())
    lines = (source / "forget10.json").read_text().splitlines()
    row = json.loads(lines[2])
    row["answer"] = ""
    lines[2] = json.dumps(row)
    (source / "forget10.json").write_text("\n".join(lines) + "\n")
    return source


def test_fit_bad_data_file_names_file_row_and_field(tmp_path, world_dir, bad_source):
    result = run_cli("fit", "--config", str(fit_config(tmp_path, world_dir, source=str(bad_source))))
    _assert_user_error(result, "forget10.json", "row 3", "'answer' is empty")
    assert not (tmp_path / "out").exists()


def test_fit_unknown_split_and_prompt_too_long(tmp_path, world_dir):
    result = run_cli("fit", "--config", str(fit_config(tmp_path, world_dir, forget_split="forget99")))
    _assert_user_error(result, "unknown split 'forget99'", "forget10")
    result = run_cli("fit", "--config", str(fit_config(tmp_path, world_dir, max_length=4)))
    _assert_user_error(result, "no room for the answer within max_length=4")


def test_fit_missing_model_path(tmp_path, world_dir):
    config = fit_config(tmp_path, world_dir)
    spec = yaml.safe_load(config.read_text())
    spec["model"]["init_args"]["model"] = {"path": str(tmp_path / "no_model")}
    config.write_text(yaml.safe_dump(spec))
    result = run_cli("fit", "--config", str(config))
    _assert_user_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_wandb_logger_config_runs_offline(tmp_path, world_dir):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    config = fit_config(tmp_path, world_dir)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_unlearn", "fit", "--config", str(config),
         "--config", str(repo / "configs" / "logger" / "wandb.yaml")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).parents[1] / "configs" / "trainer").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_trainer_config_names_real_arguments(config):
    """GPU configs cannot build a Trainer here, so check what can be wrong offline: every key is a
    Trainer argument and a strategy's class imports and accepts its init_args."""
    import importlib
    import inspect

    import lightning as L

    trainer = yaml.safe_load(config.read_text())["trainer"]
    inspect.signature(L.Trainer).bind(**{k: v for k, v in trainer.items() if k != "strategy"})
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict):
        module, _, name = strategy["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        inspect.signature(cls).bind(**strategy.get("init_args", {}))
    if isinstance(strategy, dict) and strategy["class_path"].endswith("ModelParallelStrategy"):
        args = strategy["init_args"]
        processes = trainer.get("devices", 1) * trainer.get("num_nodes", 1)
        assert args["data_parallel_size"] * args["tensor_parallel_size"] == processes
    # Objective settings a trainer config adds (activation checkpointing) are UnlearningObjective's.
    from lightning_unlearn.objectives.base import UnlearningObjective

    model_args = yaml.safe_load(config.read_text()).get("model", {}).get("init_args", {})
    inspect.signature(UnlearningObjective).bind(**model_args)
