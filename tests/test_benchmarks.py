"""Benchmarks by name: ``protocol`` builds the runner a config's ``benchmark:`` names with the same
settings as that benchmark's own command, TOFU's protocol by default; an unknown name is a
one-line error; ``evaluate --benchmark`` scores as the benchmark's ``evaluate`` does; and
``tofu.evaluate`` is the Evaluator's report."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from test_cli import _assert_user_error, run_cli

from lightning_unlearn import muse, tofu, wmdp
from lightning_unlearn.benchmarks import BENCHMARKS
from lightning_unlearn.cli import build_evaluate, build_muse, build_protocol, build_wmdp
from lightning_unlearn.data.formatting import PromptFormat
from lightning_unlearn.data.synthetic_choice import ChoiceWorldConfig, make_choice_world
from lightning_unlearn.data.synthetic_muse import MuseWorldConfig, make_muse_world
from lightning_unlearn.errors import UserError
from lightning_unlearn.evaluation import Evaluator, load_eval_splits
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.models import ModelSpec, load_model, load_spec_tokenizer
from lightning_unlearn.protocol import TABLE_COLUMNS, Protocol
from lightning_unlearn.protocol_config import build_protocol as build_tofu_protocol
from lightning_unlearn.resume import settings_fingerprint

CONFIGS = Path(__file__).parents[1] / "configs"


def _objective(objective) -> tuple:
    """An objective's class and public settings (an optimizer factory as its class and arguments)."""
    settings = {}
    for key, value in vars(objective).items():
        if isinstance(value, functools.partial):
            value = (value.func, value.args, value.keywords)
        if not key.startswith("_"):
            settings[key] = value
    return type(objective).__name__, settings


def _stage(stage) -> dict:
    """A training stage's settings, its objective compared by ``_objective``."""
    settings = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage) if f.name != "objective"}
    return {**settings, "objective": _objective(stage.objective)}


def _settings(run) -> dict:
    """A WMDP or MUSE run's settings, its stages compared by ``_stage``."""
    plain = {k: v for k, v in vars(run).items() if k not in ("unlearn", "finetune", "retrain")}
    for key in ("finetune", "retrain"):
        stage = getattr(run, key, None)
        plain[key] = None if stage is None else _stage(stage)
    unlearn = run.unlearn
    plain["unlearn"] = (
        {n: _stage(s) for n, s in unlearn.items()} if isinstance(unlearn, dict) else _stage(unlearn)
    )
    return plain


@pytest.mark.parametrize(
    "name, build, config",
    [("wmdp", build_wmdp, "wmdp_demo.yaml"), ("muse", build_muse, "muse_demo.yaml"),
     ("wmdp", build_wmdp, "wmdp/rmu.yaml"), ("muse", build_muse, "muse/books.yaml")],
)  # fmt: skip
def test_protocol_builds_the_named_benchmarks_run(name, build, config, tmp_path):
    """``protocol`` on a config with ``benchmark: <name>`` builds that benchmark's runner with every
    setting its own command builds, command-line overrides included; a copy of the config without
    the key runs the same with ``--benchmark`` on the command line."""
    argv = ["--config", str(CONFIGS / config), "--out_dir", str(tmp_path), "--seed", "7"]
    by_protocol, by_command = build_protocol(argv), build(argv)
    assert type(by_protocol) is BENCHMARKS[name].runner and type(by_command) is BENCHMARKS[name].runner
    expected = _settings(by_command)
    assert (
        expected["seed"] == 7
        and expected["run_dir"] == tmp_path / yaml.safe_load((CONFIGS / config).read_text())["name"]
    )
    assert _settings(by_protocol) == expected
    spec = yaml.safe_load((CONFIGS / config).read_text())
    assert spec.pop("benchmark") == name
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(spec))
    plain = build_protocol(["--config", str(tmp_path / "plain.yaml"), "--benchmark", name, *argv[2:]])
    assert _settings(plain) == expected


def test_tofu_is_the_default_and_unchanged(tmp_path):
    """Without ``benchmark:`` (or with ``tofu``) the command builds the TOFU protocol exactly as
    its own config reader does; a ``benchmark: muse`` reaching that reader (a sweep's protocol
    config) is refused by name."""
    argv = ["--config", str(CONFIGS / "demo.yaml")]
    direct = build_tofu_protocol(argv)
    for given in (argv, [*argv, "--benchmark", "tofu"]):
        built = build_protocol(given)
        assert type(built) is Protocol
        assert settings_fingerprint(built.settings()) == settings_fingerprint(direct.settings())
    with pytest.raises(UserError, match=r"benchmark: 'muse', but this reads a TOFU protocol config"):
        build_tofu_protocol([*argv, "--benchmark", "muse"])


def test_unknown_benchmark_is_one_line_naming_file_and_key(tmp_path):
    spec = yaml.safe_load((CONFIGS / "wmdp_demo.yaml").read_text())
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**spec, "benchmark": "wmpd"}))
    result = run_cli("protocol", "--config", str(config))
    _assert_user_error(result, f"{config}: benchmark: unknown benchmark 'wmpd'; known: muse, tofu, wmdp")
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match=r"command line: benchmark: unknown benchmark 'mmlu'"):
        build_evaluate(["--benchmark", "mmlu", "--model", "m"])
    with pytest.raises(UserError, match=r"muse_demo.yaml: benchmark: 'muse', but `lightning-unlearn wmdp`"):
        build_wmdp(["--config", str(CONFIGS / "muse_demo.yaml")])


def test_modules_agree_with_their_tables():
    """Each benchmark's module names itself as the dict does, and its METRICS are the table its
    runner prints: the protocol's first columns, the MUSE run's columns, the accuracy of WMDP's
    default question sets."""
    for name, bench in BENCHMARKS.items():
        assert name == bench.module.NAME and callable(bench.module.evaluate)
        assert isinstance(bench.module.METRICS, tuple) and bench.module.DEFAULT_FORMAT is not None
    assert tuple(TABLE_COLUMNS[: len(tofu.METRICS)]) == tofu.METRICS
    assert TABLE_COLUMNS[len(tofu.METRICS)].startswith(("quant", "relearn"))
    assert tuple(f"{n}_accuracy" for n in wmdp.default_question_sets()) == wmdp.METRICS
    assert PromptFormat() == tofu.DEFAULT_FORMAT and muse.MuseSettings().knowmem_format == muse.DEFAULT_FORMAT


def _saved_tiny(directory: Path, tokenizer_dir: Path) -> Path:
    """A tiny Llama with random weights saved as a model directory, as ``evaluate`` reads one."""
    torch.manual_seed(0)
    spec = ModelSpec(config={**TINY_LLAMA, "max_position_embeddings": 256}, tokenizer=str(tokenizer_dir))
    tokenizer = load_spec_tokenizer(spec)
    load_model(spec, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_evaluate_wmdp_equals_wmdp_evaluate(tmp_path):
    """``evaluate --benchmark wmdp`` scores the named model on the named question sets (their
    limits kept) and saves what ``wmdp.evaluate`` returns on that model."""
    world = make_choice_world(tmp_path / "world", ChoiceWorldConfig(n_pathogens=4))
    model_dir = _saved_tiny(tmp_path / "model", world / "tokenizer")
    questions = {
        "wmdp": {"source": str(world / "wmdp"), "config": "wmdp-bio", "limit": 6},
        "mmlu": {"source": str(world / "mmlu"), "config": "all"},
    }
    command = build_evaluate([
        "--benchmark", "wmdp", "--model", str(model_dir), "--questions", json.dumps(questions),
        "--batch_size", "5", "--max_length", "256", "--out_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    report = command.run()
    spec = ModelSpec(path=str(model_dir))
    loaded = {n: wmdp.QuestionSet(**q).load() for n, q in questions.items()}
    direct = wmdp.evaluate(load_model(spec).eval(), load_spec_tokenizer(spec), loaded, 5, 256)
    assert len(report.per_sample["wmdp_prediction"]) == 6
    assert len(report.per_sample["mmlu_prediction"]) == len(loaded["mmlu"]) > 6
    for key in ("wmdp_accuracy", "mmlu_accuracy"):
        assert report.metrics[key] == pytest.approx(direct.metrics[key])
    assert report.per_sample["wmdp_prediction"] == direct.per_sample["wmdp_prediction"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["metrics"] == pytest.approx(direct.metrics)
    assert saved["settings"]["benchmark"] == "wmdp" and saved["settings"]["model"] == str(model_dir)


def test_evaluate_muse_equals_muse_evaluate(tmp_path):
    """``evaluate --benchmark muse`` reads MUSE's data and evaluation keys and gives
    ``muse.evaluate``'s numbers, ``privleak`` against the given retrained AUC."""
    world = make_muse_world(tmp_path / "world", MuseWorldConfig(n_facts=4))
    model_dir = _saved_tiny(tmp_path / "model", world / "tokenizer")
    config = tmp_path / "evaluate.yaml"
    evaluation = {"verbmem_max_new_tokens": 6, "knowmem_max_new_tokens": 4, "max_length": 128}
    config.write_text(yaml.safe_dump({
        "benchmark": "muse", "model": str(model_dir), "out_dir": str(tmp_path / "out"),
        "data": {"source": str(world), "limit": 3}, "evaluation": evaluation, "retrain_auc": 0.4,
    }))  # fmt: skip
    report = build_evaluate(["--config", str(config)]).run()
    spec = ModelSpec(path=str(model_dir))
    sets = muse.MuseSource(str(world), limit=3).load()
    direct = muse.evaluate(
        load_model(spec).eval(), load_spec_tokenizer(spec), sets, muse.MuseSettings(**evaluation), 0.4
    )
    assert set(muse.METRICS) <= set(report.metrics)
    assert report.metrics == pytest.approx(direct.metrics)
    assert report.metrics["privleak"] == pytest.approx((report.metrics["privleak_auc"] - 0.4) / 0.4 * 100)
    assert len(report.per_sample["privleak_forget_min_k"]) == 3
    with pytest.raises(UserError, match=r"retrain_auc must be in \(0, 1\], got 0.0"):
        build_evaluate(["--config", str(config), "--retrain_auc", "0"])


def test_tofu_evaluate_is_the_evaluators_report(world_dir, tiny_spec):
    """``tofu.evaluate`` is a thin front to the Evaluator: every metric, per-sample value and
    generation equal, forget_quality against a retain reference included."""
    tokenizer = load_spec_tokenizer(tiny_spec)
    torch.manual_seed(0)
    model = load_model(tiny_spec, tokenizer).eval()
    roles = {**tofu.EVAL_SPLITS, "holdout": "holdout10"}
    roles.pop("real_authors")  # the synthetic world has none
    splits = load_eval_splits(str(world_dir), roles, limit=4)
    fmt = PromptFormat(label_boundary="prompt_length")
    kwargs = {"batch_size": 3, "max_new_tokens": 4, "max_length": 64, "progress": False}
    reference = Evaluator(tokenizer, splits, fmt, **kwargs).run(model).per_sample["forget_truth_ratio"]
    reference = [r * 1.5 for r in reference]  # a retain model's ratios, away from the model's own
    direct = Evaluator(tokenizer, splits, fmt, retain_truth_ratios=reference, retain_mia_auc=0.6, **kwargs)
    expected = direct.run(model)
    settings = EvaluationSettings(batch_size=3, max_new_tokens=4)
    report = tofu.evaluate(
        model, tokenizer, splits, settings, fmt, 64, reference, retain_mia_auc=0.6, progress=False
    )
    assert {"forget_quality", "model_utility", "privleak", "forget_Q_A_ROUGE"} <= set(report.metrics)
    assert report.metrics == expected.metrics
    assert report.per_sample == expected.per_sample and report.generations == expected.generations
    assert report.settings == {**expected.settings, "benchmark": "tofu"}
