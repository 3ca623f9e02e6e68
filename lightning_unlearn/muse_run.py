"""``lightning-unlearn muse``: unlearn documents and measure it with MUSE's VerbMem, KnowMem and PrivLeak.

Steps, each model written atomically and kept by a rerun of the same command:
1. data: the generated miniature in MUSE's layout (``synthetic``, ``data/synthetic_muse.py``) or
   the hub's ``muse-bench/MUSE-News`` / ``MUSE-Books`` (or a local copy of one);
2. ``finetune`` (optional): train the base model on ``data.target`` into the target (a real run
   starts from MUSE's target model instead);
3. ``retrain`` (optional): train the base model on ``data.retrain`` only, the model PrivLeak is
   measured against; a real run names MUSE's retrained model (``retrain_model``) or its published
   AUC (``retrain_auc``);
4. ``unlearn``: each named objective on the raw forget documents (with the retain documents for
   the regularised ones), from the target;
5. score every model (``muse.evaluate``) and write ``<out_dir>/<name>/report.json`` (one entry per
   model: ``forget_verbmem``, ``forget_knowmem``, ``retain_knowmem``, ``privleak``) and ``report.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_unlearn import muse
from lightning_unlearn.benchmark_run import SYNTHETIC, BenchmarkRun
from lightning_unlearn.data.corpora import Corpus
from lightning_unlearn.data.datamodule import check_at_least
from lightning_unlearn.data.synthetic_muse import MuseWorldConfig, make_muse_world
from lightning_unlearn.errors import UserError
from lightning_unlearn.metrics.muse import privleak
from lightning_unlearn.models import ModelSpec
from lightning_unlearn.report import Report
from lightning_unlearn.train_stage import TrainStage


@dataclass
class MuseData:
    """Where documents and scored sets come from. ``source: synthetic`` generates the miniature
    from ``world``; otherwise ``source`` is a hub id or a local copy in its layout. Unset corpora
    default to MUSE's: ``forget`` = ``raw``/``forget``, ``retain`` = ``raw``/``retain1``, and for
    the miniature ``target`` = ``train``/``forget``, ``retain1``, ``retain2`` and ``retrain`` =
    ``train``/``retain1``, ``retain2``. ``windows: true`` trains as MUSE's baselines do: each role's
    documents joined and cut into ``max_length``-token windows (``data/windows.py``), so every
    token is trained on; otherwise each document is one row, cut at ``max_length`` tokens."""

    source: str = SYNTHETIC
    world: MuseWorldConfig = field(default_factory=MuseWorldConfig)
    target: list[Corpus] = field(default_factory=list)
    retrain: list[Corpus] = field(default_factory=list)
    forget: list[Corpus] = field(default_factory=list)
    retain: list[Corpus] = field(default_factory=list)
    retain_qa: str = "retain_qa"
    limit: int | None = None
    max_length: int = 2048
    windows: bool = False

    def __post_init__(self) -> None:
        check_at_least(2, "data", max_length=self.max_length)
        check_at_least(1, "data", limit=self.limit)

    def resolved(self, run_dir: Path) -> tuple[MuseData, muse.MuseSource]:
        """These settings with every unset corpus filled in, and the scored sets' source."""
        root = self.source
        defaults: dict[str, list[Corpus]] = {}
        if self.source == SYNTHETIC:
            root = str(make_muse_world(run_dir / "world", self.world))
            train = [Corpus(root, "train", split) for split in ("forget", "retain1", "retain2")]
            defaults = {"target": train, "retrain": train[1:]}
        defaults |= {"forget": [Corpus(root, "raw", "forget")], "retain": [Corpus(root, "raw", "retain1")]}
        data = dataclasses.replace(self, **{k: getattr(self, k) or v for k, v in defaults.items()})
        return data, muse.MuseSource(root, self.retain_qa, self.limit)


class MuseRun(BenchmarkRun):
    """Fine-tune and retrain (optional), unlearn with each objective and score on MUSE; see the
    module docstring.

    Args:
        name: the run's directory under ``out_dir``.
        model: the base model (built from a config, with the generated tokenizer, for the demo).
        unlearn: objective name -> its unlearning stage (each starts from the target).
        finetune: train the base model on ``data.target`` first; None unlearns ``model`` itself.
        retrain: train the base model on ``data.retrain``: PrivLeak's reference model.
        retrain_model: a retrained model to score instead (e.g. MUSE's own).
        retrain_auc: the retrained model's PrivLeak AUC, when no retrained model is scored
            (``muse.RETRAIN_AUC`` holds MUSE's published ones).
        evaluation: generation lengths, Min-K%'s k, batch sizes (MUSE's defaults).
    """

    def __init__(
        self,
        name: str,
        model: ModelSpec,
        unlearn: dict[str, TrainStage],
        finetune: TrainStage | None = None,
        retrain: TrainStage | None = None,
        retrain_model: ModelSpec | None = None,
        retrain_auc: float | None = None,
        data: MuseData | None = None,
        evaluation: muse.MuseSettings | None = None,
        trainer: dict[str, Any] | None = None,
        out_dir: str = "runs",
        seed: int = 0,
    ) -> None:
        if sum(x is not None for x in (retrain, retrain_model, retrain_auc)) != 1:
            raise UserError("PrivLeak needs exactly one of retrain, retrain_model and retrain_auc")
        muse.check_retrain_auc(retrain_auc)
        if not unlearn:
            raise UserError("unlearn names no objective")
        reserved = {"target", "retrain"} & set(unlearn)
        if reserved:
            raise UserError(f"unlearn: '{sorted(reserved)[0]}' names a model of the run; call it otherwise")
        super().__init__(name, model, trainer, out_dir, seed)
        self.unlearn, self.finetune, self.retrain = unlearn, finetune, retrain
        self.retrain_model, self.retrain_auc = retrain_model, retrain_auc
        self.data = data or MuseData()
        self.evaluation = evaluation or muse.MuseSettings()

    def _score(self, spec: ModelSpec, sets: muse.MuseSets, retrain_auc: float | None) -> Report:
        model, tokenizer = self._load(spec)
        report = muse.evaluate(model, tokenizer, sets, self.evaluation, retrain_auc)
        report.settings["model"] = spec.path or "base model from config"
        return report

    def _run(self) -> tuple[dict[str, Report], list[str]]:
        data, source = self.data.resolved(self.run_dir)
        base = self._base(data.source)
        sets = source.load()
        target = base
        if self.finetune is not None:
            target = self._train_texts(
                "target", self.finetune, base, data.target, data.max_length, ("finetune", "data.target"),
                windows=data.windows,
            )  # fmt: skip
        retrain = self.retrain_model
        if self.retrain is not None:
            retrain = self._train_texts(
                "retrain", self.retrain, base, data.retrain, data.max_length, ("retrain", "data.retrain"),
                windows=data.windows,
            )  # fmt: skip
        unlearned = {
            name: self._unlearn(
                name, stage, target, data.forget, data.retain, data.max_length, windows=data.windows
            )
            for name, stage in self.unlearn.items()
        }
        reports: dict[str, Report] = {}
        retrain_auc = self.retrain_auc
        if retrain is not None:
            reports["retrain"] = self._score(retrain, sets, None)
            retrain_auc = reports["retrain"].metrics["privleak_auc"]
            reports["retrain"].metrics["privleak"] = privleak(retrain_auc, retrain_auc)
        reports["target"] = self._score(target, sets, retrain_auc)
        for name, spec in unlearned.items():
            reports[name] = self._score(spec, sets, retrain_auc)
        order = ["target", *(["retrain"] if "retrain" in reports else []), *unlearned]
        return {n: reports[n] for n in order}, list(muse.METRICS)
