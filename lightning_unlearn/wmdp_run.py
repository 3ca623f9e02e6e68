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
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_unlearn import wmdp
from lightning_unlearn.data.corpora import Corpus, CorpusUnlearningDataModule, TextDataModule
from lightning_unlearn.data.datamodule import check_at_least
from lightning_unlearn.data.synthetic_choice import ChoiceWorldConfig, make_choice_world
from lightning_unlearn.errors import UserError
from lightning_unlearn.io import write_text_atomic
from lightning_unlearn.models import ModelSpec, load_model, load_spec_tokenizer
from lightning_unlearn.quiet import quiet_libraries
from lightning_unlearn.report import Report, metrics_table
from lightning_unlearn.train_stage import TrainStage, train_stage, with_generated_tokenizer

SYNTHETIC = "synthetic"


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


class WmdpRun:
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
        self.name, self.base, self.unlearn, self.finetune = name, model, unlearn, finetune
        self.data = data or WmdpData()
        self.trainer_args = dict(trainer or {})
        self.run_dir = Path(out_dir) / name
        self.seed, self.eval_batch_size, self.eval_max_length = seed, eval_batch_size, eval_max_length

    def _train(self, stage_name: str, stage: TrainStage, spec: ModelSpec, datamodule) -> Path:
        return train_stage(self.run_dir, stage_name, stage, spec, datamodule, self.seed, self.trainer_args)

    def _score(self, spec: ModelSpec, questions: dict[str, list[dict]]) -> Report:
        tokenizer, model = load_spec_tokenizer(spec), load_model(spec).eval()
        report = wmdp.evaluate(model, tokenizer, questions, self.eval_batch_size, self.eval_max_length)
        if spec.path is not None:
            report.settings["model_dir"] = spec.path
        return report

    def run(self) -> dict[str, Report]:
        with quiet_libraries():
            return self._run()

    def _run(self) -> dict[str, Report]:
        start = time.perf_counter()
        data = self.data.resolved(self.run_dir)
        base = with_generated_tokenizer(self.base, data.source == SYNTHETIC, self.run_dir)
        questions = {name: q.load() for name, q in data.questions.items()}
        if self.finetune is not None:
            if not data.finetune:
                raise UserError("finetune is set but data.finetune names no corpus")
            dm = TextDataModule(
                base.tokenizer_path, data.finetune, data.max_length, self.finetune.batch_size, seed=self.seed,
                windows=data.windows,
            )  # fmt: skip
            target = self._train("finetuned", self.finetune, base, dm)
            target_spec = ModelSpec(path=str(target), dtype=base.dtype)
        else:
            target, target_spec = None, base
        dm = CorpusUnlearningDataModule(
            target_spec.tokenizer_path, data.forget, data.retain, data.max_length, self.unlearn.batch_size,
            self.unlearn.retain_per_forget, seed=self.seed, windows=data.windows,
        )  # fmt: skip
        name = type(self.unlearn.objective).__name__.lower()
        unlearned = self._train(name, self.unlearn, target_spec, dm)
        reports = {}
        reports["base" if target is None else "finetuned"] = self._score(target_spec, questions)
        reports[name] = self._score(ModelSpec(path=str(unlearned), dtype=self.base.dtype), questions)
        self._write(reports, [f"{name}_accuracy" for name in questions], start)
        return reports

    def _write(self, reports: dict[str, Report], columns: list[str], start: float) -> None:
        table = metrics_table({n: r.metrics for n, r in reports.items()}, columns)
        write_text_atomic(
            self.run_dir / "report.json",
            json.dumps({n: r.to_dict() for n, r in reports.items()}, indent=1) + "\n",
        )
        write_text_atomic(self.run_dir / "report.md", table + "\n")
        print(table)
        print(
            f"[{self.name}] done in {time.perf_counter() - start:.0f} s; report: {self.run_dir / 'report.json'}"
        )
