"""``lightning-unlearn evaluate``: one saved model (a model directory, a GGUF file, a hub id, or a
base model plus a peft adapter directory) scored on a benchmark, written as report.json and
report.md in ``out_dir``. One command class per benchmark (``--benchmark``, ``benchmarks.py``),
each with the options of its data and scoring: TOFU's suite (``EvaluateCommand``, with a
truth-ratio CDF figure), WMDP's multiple choice, MUSE's four numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lightning_unlearn import muse, tofu, wmdp
from lightning_unlearn.data.datamodule import check_at_least
from lightning_unlearn.data.formatting import PromptFormat
from lightning_unlearn.evaluation import load_eval_splits
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.models import ModelSpec, load_adapter, load_model, load_spec_tokenizer
from lightning_unlearn.plots import truth_ratio_cdfs
from lightning_unlearn.report import Report

TOFU_EVAL_SPLITS = tofu.EVAL_SPLITS


@dataclass(kw_only=True)
class ScoredModel:
    """The model an ``evaluate`` command scores and where its report goes.

    Args:
        model: model directory, ``.gguf`` file or hub id (the base model when ``adapter`` is set).
        adapter: a peft adapter directory to attach to ``model`` (e.g. an ExportModel output).
        tokenizer: defaults to the adapter's directory when it holds a tokenizer, else the model's.
        out_dir: where report.json and report.md go.
        dtype: the weights' dtype once loaded.
    """

    model: str
    adapter: str | None = None
    tokenizer: str | None = None
    out_dir: str = "runs/evaluate"
    dtype: str = "float32"

    def tokenizer_path(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        if self.adapter and (Path(self.adapter) / "tokenizer_config.json").is_file():
            return self.adapter
        return self.model

    def spec(self) -> ModelSpec:
        return ModelSpec(path=self.model, tokenizer=self.tokenizer_path(), dtype=self.dtype)

    def load_model(self):
        """The model, its adapter attached."""
        model = load_model(self.spec())
        return load_adapter(model, self.adapter) if self.adapter else model

    def saved(self, report: Report, **settings) -> Report:
        """``report`` with what was scored in its settings, written to ``out_dir``."""
        report.settings.update(model=self.model, adapter=self.adapter, **settings)
        report.save(self.out_dir)
        return report


@dataclass(kw_only=True)
class EvaluateCommand(EvaluationSettings, ScoredModel):
    """Evaluate a model on TOFU-style splits: the ``EvaluationSettings`` (batch sizes, generation
    budget, fast mode, closer-look models) and what to evaluate with them; also writes
    truth_ratios.png.

    Args:
        source: ``locuslab/TOFU`` or a local directory in its layout (or any JSON/JSONL files).
        splits: role (forget, retain, real_authors, world_facts, holdout) -> split name.
        limit: evaluate the first N rows of each split.
        retain_report: the retain model's report (file or directory), for forget_quality.
        prompt_format: how a question becomes a prompt, as the model was trained.
        max_length: the longest encoded question and answer, in tokens, as the model was trained.
    """

    section: ClassVar[str] = "evaluate"

    source: str = tofu.HUB_ID
    splits: dict[str, str] = field(default_factory=lambda: dict(tofu.EVAL_SPLITS))
    limit: int | None = None
    retain_report: str | None = None
    prompt_format: PromptFormat = field(default_factory=lambda: tofu.DEFAULT_FORMAT)
    max_length: int = 512

    def __post_init__(self) -> None:
        check_at_least(1, self.section, limit=self.limit, max_length=self.max_length)
        super().__post_init__()

    def run(self) -> Report:
        splits = load_eval_splits(self.source, self.splits, self.limit)
        tokenizer = load_spec_tokenizer(self.spec())
        evaluator = self.evaluator(
            tokenizer,
            splits,
            prompt_format=self.prompt_format,
            max_length=self.max_length,
            retain_truth_ratios=self.retain_report,
        )
        report = evaluator.run(self.load_model())
        self.saved(report, source=str(self.source), splits=self.splits)
        if "forget_truth_ratio" in report.per_sample:
            series = {"model": report.per_sample["forget_truth_ratio"]}
            if evaluator.retain_truth_ratios is not None:
                series["retain"] = list(evaluator.retain_truth_ratios)
            quality = (
                {"model": report.metrics["forget_quality"]} if "forget_quality" in report.metrics else None
            )
            truth_ratio_cdfs(series, Path(self.out_dir) / "truth_ratios.png", quality)
        return report


@dataclass(kw_only=True)
class WmdpEvaluateCommand(ScoredModel):
    """Score a model on WMDP-style multiple-choice question sets (``wmdp.evaluate``): zero-shot
    accuracy per set in lm-eval's format.

    Args:
        questions: name -> question set (``source``: hub id or local copy, ``config``, ``split``,
            ``limit``), as a wmdp run's ``data.questions``; WMDP-bio and all of MMLU by default.
        batch_size: rows per scoring forward.
        max_length: the longest prompt and answer in tokens; longer ones are cut on the left.
    """

    questions: dict[str, wmdp.QuestionSet] = field(default_factory=wmdp.default_question_sets)
    batch_size: int = 16
    max_length: int = 2048

    def __post_init__(self) -> None:
        check_at_least(1, "evaluate", batch_size=self.batch_size)
        check_at_least(2, "evaluate", max_length=self.max_length)

    def run(self) -> Report:
        questions = {name: q.load() for name, q in self.questions.items()}
        tokenizer = load_spec_tokenizer(self.spec())
        model = self.load_model().eval()
        report = wmdp.evaluate(model, tokenizer, questions, self.batch_size, self.max_length)
        return self.saved(report, questions={n: vars(q) for n, q in self.questions.items()})


@dataclass(kw_only=True)
class MuseEvaluateCommand(ScoredModel):
    """Score a model with MUSE's VerbMem, KnowMem and PrivLeak (``muse.evaluate``).

    Args:
        data: where the scored sets come from (``source``: ``muse-bench/MUSE-News`` /
            ``MUSE-Books`` or a local copy in its layout, ``retain_qa``, ``limit``), as a muse
            run's ``data`` keys of the same names.
        evaluation: generation lengths, Min-K%'s k, batch sizes, as a muse run's ``evaluation``.
        retrain_auc: the retrained model's PrivLeak AUC (``privleak_auc`` of its report, or MUSE's
            published one: 0.4772 News, 0.5393 Books), for ``privleak``; None leaves it out.
    """

    data: muse.MuseSource = field(default_factory=muse.MuseSource)
    evaluation: muse.MuseSettings = field(default_factory=muse.MuseSettings)
    retrain_auc: float | None = None

    def __post_init__(self) -> None:
        muse.check_retrain_auc(self.retrain_auc)

    def run(self) -> Report:
        sets = self.data.load()
        tokenizer = load_spec_tokenizer(self.spec())
        model = self.load_model().eval()
        report = muse.evaluate(model, tokenizer, sets, self.evaluation, self.retrain_auc)
        return self.saved(report, source=self.data.source)
