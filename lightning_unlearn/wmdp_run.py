"""``lightning-unlearn wmdp``: unlearn a hazardous domain with corpora and measure it on WMDP and MMLU.

Steps, each model written atomically and kept by a rerun of the same command:
1. data: the generated miniature set (``synthetic``, ``data/synthetic_choice.py``) or the hub's;
2. ``finetune`` (optional): fine-tune the base model on text corpora into the target (the demo
   builds a tiny target that knows both domains; a real run starts from a pretrained model);
3. ``unlearn``: the objective (RMU in the configs) on the forget corpora, held by the retain corpora;
4. score the target and the unlearned model on every question set (``wmdp.evaluate``) and write
   ``<out_dir>/<name>/report.json`` (one entry per model) and ``report.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_unlearn import wmdp
from lightning_unlearn.benchmark_run import SYNTHETIC, BenchmarkRun
from lightning_unlearn.data.corpora import Corpus
from lightning_unlearn.data.datamodule import check_at_least
from lightning_unlearn.data.synthetic_choice import ChoiceWorldConfig, make_choice_world
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import ModelSpec
from lightning_unlearn.report import Report
from lightning_unlearn.train_stage import TrainStage


@dataclass
class WmdpData:
    """Where corpora and questions come from. ``source: synthetic`` generates the miniature set
    from ``world`` and fills every unset role from it; otherwise each role names its own hub id or
    local copy (``configs/wmdp/rmu.yaml``). Each text is one row cut at ``max_length`` tokens, as
    WMDP's RMU reads its corpora; ``windows: true`` joins them and cuts ``max_length``-token windows
    instead (MUSE's rows, ``data/windows.py``)."""

    source: str = SYNTHETIC
    world: ChoiceWorldConfig = field(default_factory=ChoiceWorldConfig)
    finetune: list[Corpus] = field(default_factory=list)
    forget: list[Corpus] = field(default_factory=list)
    retain: list[Corpus] = field(default_factory=list)
    questions: dict[str, wmdp.QuestionSet] = field(default_factory=dict)
    max_length: int = 512
    windows: bool = False

    def __post_init__(self) -> None:
        check_at_least(2, "data", max_length=self.max_length)

    def resolved(self, run_dir: Path) -> WmdpData:
        """These settings with the generated set's files for every unset role."""
        if self.source != SYNTHETIC:
            if not (self.forget and self.retain):
                raise UserError(
                    "data.forget and data.retain must name corpora unless data.source is synthetic"
                )
            return dataclasses.replace(self, questions=self.questions or wmdp.default_question_sets())
        root = make_choice_world(run_dir / "world", self.world)
        defaults = {
            "finetune": [Corpus(str(root / "train.json"))],
            "forget": [Corpus(str(root / "corpora" / "bio-forget-corpus.json"))],
            "retain": [Corpus(str(root / "corpora" / "retain-corpus.json"))],
            "questions": {
                "wmdp": wmdp.QuestionSet(str(root / "wmdp"), "wmdp-bio"),
                "mmlu": wmdp.QuestionSet(str(root / "mmlu"), "all"),
            },
        }
        return dataclasses.replace(self, **{k: getattr(self, k) or v for k, v in defaults.items()})


class WmdpRun(BenchmarkRun):
    """Fine-tune (optional), unlearn and score on WMDP-style question sets; see the module docstring.

    Args:
        name: the run's directory under ``out_dir``.
        model: the base model (built from a config, with the generated tokenizer, for the demo).
        unlearn: the unlearning stage.
        finetune: fine-tune the base model on ``data.finetune`` first; None unlearns ``model`` itself.
        eval_batch_size / eval_max_length: the scorer's forward rows and left-truncation length.
    """

    def __init__(
        self,
        name: str,
        model: ModelSpec,
        unlearn: TrainStage,
        finetune: TrainStage | None = None,
        data: WmdpData | None = None,
        trainer: dict[str, Any] | None = None,
        out_dir: str = "runs",
        seed: int = 0,
        eval_batch_size: int = 16,
        eval_max_length: int = 2048,
    ) -> None:
        check_at_least(1, "wmdp", eval_batch_size=eval_batch_size)
        check_at_least(2, "wmdp", eval_max_length=eval_max_length)
        super().__init__(name, model, trainer, out_dir, seed)
        self.unlearn, self.finetune = unlearn, finetune
        self.data = data or WmdpData()
        self.eval_batch_size, self.eval_max_length = eval_batch_size, eval_max_length

    def _score(self, spec: ModelSpec, questions: dict[str, list[dict]]) -> Report:
        model, tokenizer = self._load(spec)
        report = wmdp.evaluate(model, tokenizer, questions, self.eval_batch_size, self.eval_max_length)
        if spec.path is not None:
            report.settings["model_dir"] = spec.path
        return report

    def _run(self) -> tuple[dict[str, Report], list[str]]:
        data = self.data.resolved(self.run_dir)
        base = self._base(data.source)
        questions = {name: q.load() for name, q in data.questions.items()}
        target = base
        if self.finetune is not None:
            target = self._train_texts(
                "finetuned",
                self.finetune,
                base,
                data.finetune,
                data.max_length,
                ("finetune", "data.finetune"),
                windows=data.windows,
            )
        name = type(self.unlearn.objective).__name__.lower()
        unlearned = self._unlearn(
            name, self.unlearn, target, data.forget, data.retain, data.max_length, windows=data.windows
        )
        reports = {}
        reports["base" if self.finetune is None else "finetuned"] = self._score(target, questions)
        reports[name] = self._score(unlearned, questions)
        return reports, [f"{name}_accuracy" for name in questions]
