"""What every benchmark's runner does the same way (``wmdp_run.py``, ``muse_run.py``): train its
stages into model directories a rerun keeps, load and score models, and write
``<out_dir>/<name>/report.json`` (one entry per model), ``report.md`` and the printed table, all
with Lightning's per-stage notices silenced. A runner says only which models it trains from which
data and how its benchmark scores one (``_run``), so a new benchmark's runner is small."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lightning_unlearn.data.corpora import Corpus, CorpusUnlearningDataModule, TextDataModule
from lightning_unlearn.errors import UserError
from lightning_unlearn.io import write_text_atomic
from lightning_unlearn.models import ModelSpec, load_model, load_spec_tokenizer
from lightning_unlearn.quiet import quiet_libraries
from lightning_unlearn.report import Report, metrics_table
from lightning_unlearn.train_stage import TrainStage, train_stage, with_generated_tokenizer

# ``data.source`` of a run on its benchmark's generated miniature (no download).
SYNTHETIC = "synthetic"


class BenchmarkRun:
    """A benchmark's run: ``run_dir = out_dir / name``, the base model, the Trainer arguments
    every stage shares and the seed. Subclasses implement ``_run``: the models trained and scored,
    as reports by model name (in table order) and the table's columns."""

    def __init__(
        self, name: str, model: ModelSpec, trainer: dict[str, Any] | None, out_dir: str, seed: int
    ) -> None:
        self.name, self.base, self.seed = name, model, seed
        self.trainer_args = dict(trainer or {})
        self.run_dir = Path(out_dir) / name

    def run(self) -> dict[str, Report]:
        """Train and score every model, write the reports, print the table."""
        with quiet_libraries():
            start = time.perf_counter()
            reports, columns = self._run()
            self._write(reports, columns, start)
            return reports

    def _run(self) -> tuple[dict[str, Report], list[str]]:
        raise NotImplementedError

    def _base(self, source: str) -> ModelSpec:
        """The base model, with the generated miniature's tokenizer when the run uses it."""
        return with_generated_tokenizer(self.base, source == SYNTHETIC, self.run_dir)

    def _train(self, stage_name: str, stage: TrainStage, spec: ModelSpec, datamodule) -> ModelSpec:
        """``stage`` trained from ``spec`` into ``run_dir/models/<stage_name>`` (kept by a rerun)."""
        directory = train_stage(
            self.run_dir, stage_name, stage, spec, datamodule, self.seed, self.trainer_args
        )
        return ModelSpec(path=str(directory), dtype=self.base.dtype)

    def _train_texts(
        self, stage_name: str, stage: TrainStage, spec: ModelSpec, corpora: list[Corpus], max_length: int,
        keys: tuple[str, str], windows: bool = False,
    ) -> ModelSpec:  # fmt: skip
        """``stage`` as next-token training on ``corpora`` (a fine-tuned target, a retrained
        model); ``keys`` (the stage's and the corpora's config keys) name them when there are none;
        ``windows``: rows cut as MUSE's baselines cut them (``data/windows.py``)."""
        if not corpora:
            raise UserError(f"{keys[0]} is set but {keys[1]} names no corpus")
        dm = TextDataModule(
            spec.tokenizer_path, corpora, max_length, stage.batch_size, seed=self.seed, windows=windows
        )
        return self._train(stage_name, stage, spec, dm)

    def _unlearn(
        self, stage_name: str, stage: TrainStage, spec: ModelSpec, forget: list[Corpus], retain: list[Corpus],
        max_length: int, windows: bool = False,
    ) -> ModelSpec:  # fmt: skip
        """``stage`` as unlearning ``forget``'s documents from ``spec``, held by ``retain``'s."""
        dm = CorpusUnlearningDataModule(
            spec.tokenizer_path, forget, retain, max_length, stage.batch_size, stage.retain_per_forget,
            seed=self.seed, windows=windows,
        )  # fmt: skip
        return self._train(stage_name, stage, spec, dm)

    @staticmethod
    def _load(spec: ModelSpec):
        """(model in eval mode, tokenizer) of ``spec``, for scoring."""
        tokenizer = load_spec_tokenizer(spec)
        return load_model(spec).eval(), tokenizer

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
