"""``lightning-unlearn evaluate``: the evaluation suite on one saved model (a model directory, a
GGUF file, a hub id, or a base model plus a peft adapter directory), written as report.json,
report.md and a truth-ratio CDF figure."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lightning_unlearn.data.datamodule import check_at_least
from lightning_unlearn.data.formatting import PromptFormat
from lightning_unlearn.evaluation import load_eval_splits
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.models import ModelSpec, load_adapter, load_model, load_spec_tokenizer
from lightning_unlearn.plots import truth_ratio_cdfs
from lightning_unlearn.report import Report

TOFU_EVAL_SPLITS = {
    "forget": "forget10_perturbed",
    "retain": "retain_perturbed",
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
}


@dataclass(kw_only=True)
class EvaluateCommand(EvaluationSettings):
    """Evaluate a model on TOFU-style splits: the ``EvaluationSettings`` (batch sizes, generation
    budget, fast mode, closer-look models) and what to evaluate with them.

    Args:
        model: model directory, ``.gguf`` file or hub id (the base model when ``adapter`` is set).
        adapter: a peft adapter directory to attach to ``model`` (e.g. an ExportModel output).
        tokenizer: defaults to the adapter's directory when it holds a tokenizer, else the model's.
        source: ``locuslab/TOFU`` or a local directory in its layout (or any JSON/JSONL files).
        splits: role (forget, retain, real_authors, world_facts, holdout) -> split name.
        limit: evaluate the first N rows of each split.
        retain_report: the retain model's report (file or directory), for forget_quality.
        out_dir: where report.json, report.md and truth_ratios.png go.
        prompt_format: how a question becomes a prompt, as the model was trained.
        max_length: the longest encoded question and answer, in tokens, as the model was trained.
        dtype: the weights' dtype once loaded.
    """

    section: ClassVar[str] = "evaluate"

    model: str
    adapter: str | None = None
    tokenizer: str | None = None
    source: str = "locuslab/TOFU"
    splits: dict[str, str] = field(default_factory=lambda: dict(TOFU_EVAL_SPLITS))
    limit: int | None = None
    retain_report: str | None = None
    out_dir: str = "runs/evaluate"
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    max_length: int = 512
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_at_least(1, self.section, limit=self.limit, max_length=self.max_length)
        super().__post_init__()

    def tokenizer_path(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        if self.adapter and (Path(self.adapter) / "tokenizer_config.json").is_file():
            return self.adapter
        return self.model

    def run(self) -> Report:
        splits = load_eval_splits(self.source, self.splits, self.limit)
        spec = ModelSpec(path=self.model, tokenizer=self.tokenizer_path(), dtype=self.dtype)
        tokenizer = load_spec_tokenizer(spec)
        evaluator = self.evaluator(
            tokenizer,
            splits,
            prompt_format=self.prompt_format,
            max_length=self.max_length,
            retain_truth_ratios=self.retain_report,
        )
        model = load_model(spec)
        if self.adapter:
            model = load_adapter(model, self.adapter)
        report = evaluator.run(model)
        report.settings.update(
            model=self.model, adapter=self.adapter, source=str(self.source), splits=self.splits
        )
        out = report.save(self.out_dir)
        if "forget_truth_ratio" in report.per_sample:
            series = {"model": report.per_sample["forget_truth_ratio"]}
            if evaluator.retain_truth_ratios is not None:
                series["retain"] = list(evaluator.retain_truth_ratios)
            quality = (
                {"model": report.metrics["forget_quality"]} if "forget_quality" in report.metrics else None
            )
            truth_ratio_cdfs(series, out / "truth_ratios.png", quality)
        return report
