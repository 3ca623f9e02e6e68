"""EvaluationSettings: the protocol's ``evaluation:`` section, the ``evaluate`` command line and the
UnlearningEvaluation callback's init_args, given the same values, build Evaluators of the same
configuration; and an evaluation through the shared builder equals the Evaluator built directly."""

from __future__ import annotations

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_unlearn.callbacks import UnlearningEvaluation
from lightning_unlearn.cli import build_evaluate, build_protocol
from lightning_unlearn.data.formatting import PromptFormat
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.evaluation import Evaluator, load_eval_splits
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.models import load_model
from lightning_unlearn.protocol import EvalSettings

SPLITS = {"forget": "forget10_perturbed", "retain": "retain_perturbed"}
# Every setting away from its default, so a surface that drops one shows.
FORMAT = {"kind": "plain", "system_prompt": "Answer briefly.", "label_boundary": "prompt_length"}
SHARED = {"batch_size": 3, "max_new_tokens": 5, "generation_batch_size": 7, "fast": False}
MAX_LENGTH = 96


def _configuration(evaluator: Evaluator) -> dict:
    """What an Evaluator computes with, less the per-run references and the progress bar."""
    return {
        "prompt_format": evaluator.prompt_format,
        "max_length": evaluator.max_length,
        **{name: getattr(evaluator, name) for name in SHARED},
        "closer_look": (evaluator.cosine, evaluator.entailment),
    }


def test_the_three_surfaces_build_the_same_evaluator(tmp_path, world_dir, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    splits = load_eval_splits(str(world_dir), SPLITS, limit=4)

    config = tmp_path / "protocol.yaml"
    config.write_text(yaml.safe_dump({
        "name": "p", "model": {"path": "m"}, "finetune": {}, "objectives": {},
        "data": {"prompt_format": FORMAT, "max_length": MAX_LENGTH},
        "evaluation": {**SHARED, "attacks": ["quant8"]},
    }))  # fmt: skip
    protocol = build_protocol(["--config", str(config)])
    protocol.eval_splits = splits
    from_protocol = protocol._evaluator(tokenizer)

    argv = ["--model", "m", "--max_length", str(MAX_LENGTH)]
    argv += [f"--prompt_format.{k}={v}" for k, v in FORMAT.items()]
    argv += [f"--{k}={str(v).lower()}" for k, v in SHARED.items()]
    command = build_evaluate(argv)
    from_command = command.evaluator(
        tokenizer, splits, prompt_format=command.prompt_format, max_length=command.max_length
    )

    parser = ArgumentParser()
    parser.add_argument("--callback", type=UnlearningEvaluation)
    init_args = {"source": str(world_dir), "splits": SPLITS, "limit": 4, "tokenizer": tokenizer_dir,
                 "prompt_format": FORMAT, "max_length": MAX_LENGTH, **SHARED}  # fmt: skip
    parsed = parser.parse_object({"callback": {"class_path": "lightning_unlearn.callbacks.UnlearningEvaluation",
                                               "init_args": init_args}})  # fmt: skip
    callback = parser.instantiate_classes(parsed).callback
    callback.setup(None, None, "fit")

    want = {
        "prompt_format": PromptFormat(**FORMAT),
        "max_length": MAX_LENGTH,
        **SHARED,
        "closer_look": (None, None),
    }
    for evaluator in (from_protocol, from_command, callback.evaluator):
        assert _configuration(evaluator) == want
        assert evaluator.splits == splits


def test_the_shared_builder_evaluates_as_the_evaluator_built_directly(world_dir, tokenizer_dir, tiny_spec):
    """Per-sample scores, generations and forget_quality against fixed retain truth ratios: the
    builder passes every setting on (fast=False and generation_batch_size change the numbers'
    rounding and the decode batches, so a dropped one shows as a difference)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    splits = load_eval_splits(str(world_dir), SPLITS, limit=6)
    torch.manual_seed(0)
    model = load_model(tiny_spec)
    fmt = PromptFormat(**FORMAT)
    retain = [0.2, 0.4, 0.5, 0.6, 0.7, 0.9]
    direct = Evaluator(tokenizer, splits, fmt, batch_size=3, max_new_tokens=5, retain_truth_ratios=retain,
                       max_length=MAX_LENGTH, progress=False, generation_batch_size=7, fast=False).run(model)  # fmt: skip
    encoding = {
        "prompt_format": fmt,
        "max_length": MAX_LENGTH,
        "retain_truth_ratios": retain,
        "progress": False,
    }
    report = EvaluationSettings(**SHARED).evaluator(tokenizer, splits, **encoding).run(model)
    assert report.per_sample == direct.per_sample
    assert report.generations == direct.generations
    assert report.metrics == direct.metrics and "forget_quality" in report.metrics
    fast = EvaluationSettings(**{**SHARED, "fast": True}).evaluator(tokenizer, splits, **encoding)
    assert fast.run(model).per_sample != direct.per_sample  # the fast passes round differently


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: EvaluationSettings(generation_batch_size=0),
            "evaluation.generation_batch_size must be at least 1",
        ),
        (lambda: EvalSettings(max_new_tokens=-1), "evaluation.max_new_tokens must be at least 0, got -1"),
        (
            lambda: build_evaluate(["--model", "m", "--batch_size", "0"]),
            "evaluate.batch_size must be at least 1",
        ),
        (lambda: UnlearningEvaluation(generation_batch_size=0), "generation_batch_size must be at least 1"),
    ],
)
def test_bad_settings_name_their_key(build, message):
    with pytest.raises(UserError, match=message):
        build()
