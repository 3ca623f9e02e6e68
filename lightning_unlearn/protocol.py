"""The TOFU protocol from one config: fine-tune the target on all data and a retain model on the
retain data only, unlearn the target with each listed objective, evaluate every model, print a
table and write ``runs/<name>/report.json`` (one entry per model).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_unlearn import processes, tofu
from lightning_unlearn.attacks import ATTACKS, RelearnSettings, attack_metrics, check_attacks
from lightning_unlearn.callbacks import ForgetRequest, SequentialForgetting, UnlearningEvaluation
from lightning_unlearn.callbacks.sequential import request_metrics
from lightning_unlearn.data.datamodule import FineTuneDataModule, UnlearningDataModule, check_at_least
from lightning_unlearn.data.edits import InfluenceDataModule
from lightning_unlearn.data.formatting import PromptFormat
from lightning_unlearn.data.records import check_disjoint
from lightning_unlearn.data.synthetic import WorldConfig, make_world
from lightning_unlearn.data.tofu import load_split, split_where
from lightning_unlearn.errors import UserError
from lightning_unlearn.evaluation import Evaluator
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.export import export_model
from lightning_unlearn.io import atomic_directory, remove_path, write_text_atomic
from lightning_unlearn.metrics.tofu import forget_quality
from lightning_unlearn.models import LoraSpec, ModelSpec, load_adapter, load_model, load_spec_tokenizer
from lightning_unlearn.objectives import FineTune, InfluenceStep
from lightning_unlearn.objectives.adapted import AdaptedModel
from lightning_unlearn.plots import continual_forgetting, forget_quality_vs_utility, truth_ratio_cdfs
from lightning_unlearn.preemption import check as check_preempted
from lightning_unlearn.preemption import preemption_callback
from lightning_unlearn.quiet import quiet_libraries
from lightning_unlearn.report import Report, continual_table, metrics_table
from lightning_unlearn.resume import settings_fingerprint
from lightning_unlearn.safe_load import SafeTrainer
from lightning_unlearn.trainer_args import trainer_arguments

# A finished target and retain model (and their reports) record their settings here.
MODELS_MARKER = "models.fingerprint"
# What a run of the same settings links instead of training and evaluating again; a LoRA
# fine-tune (the deployed-adapter setting) also keeps its adapters apart.
ADOPTED = ("models/finetuned", "models/retain", "reports/finetuned", "reports/retain")
ADOPTED_IF_PRESENT = ("models/finetuned_adapter", "models/retain_adapter")

# The table: TOFU's headline metrics, then each attack's forget columns.
TABLE_COLUMNS = [
    *tofu.METRICS,
    *(f"{attack}_{metric}" for attack in ATTACKS for metric in ("forget_quality", "forget_Q_A_Prob")),
]


@dataclass
class DataSettings:
    """Where the protocol's data comes from and which splits play which role.

    ``source``: ``synthetic`` (generated offline from ``world``), a hub id or a local directory
    in TOFU's file layout. ``retain_limit`` trains on the first N retain rows (a CPU-sized
    subset); ``eval_limit`` caps each evaluation split. Retain evaluation keeps only questions the
    models were trained on. ``refusals`` (``builtin`` or a file) feeds the IDK objectives.
    """

    source: str = "synthetic"
    world: WorldConfig = field(default_factory=WorldConfig)
    forget_split: str = "forget10"
    retain_split: str = "retain90"
    retain_limit: int | None = None
    eval_splits: dict[str, str] = field(
        default_factory=lambda: {
            "forget": "forget10_perturbed",
            "retain": "retain_perturbed",
            "world_facts": "world_facts_perturbed",
        }
    )
    eval_limit: int | None = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    max_length: int = 256
    refusals: str = "builtin"

    def __post_init__(self) -> None:
        check_at_least(
            1, retain_limit=self.retain_limit, eval_limit=self.eval_limit, max_length=self.max_length
        )


@dataclass
class SequentialSettings:
    """An unlearning stage as a schedule of deletion requests (``SequentialForgetting``): the
    forget split cut in order into ``requests`` equal parts (one per author when the forget
    authors have equally many facts, as in the synthetic world), each unlearned for
    ``epochs_per_request`` epochs, in ``mode`` ``independent`` (fused by RegMean) or ``stacked``.
    The fused model is evaluated after every request; the stage's row is the final fused model."""

    requests: int = 5
    mode: str = "independent"
    epochs_per_request: int = 1
    ridge: float = 1e-4
    fused_rank: int | None = None


@dataclass
class AdapterFit:
    """An ``InfluenceStep`` stage's theta_hat: a LoRA fine-tune (``objective`` must have an
    ``adapter``) of the target on every training record, forget and retain, kept unmerged so the
    step can edit it. The step assumes theta_hat is a stationary point of the loss; more epochs
    bring it closer."""

    objective: FineTune = field(default_factory=lambda: FineTune(adapter=LoraSpec()))
    max_epochs: int = 1
    batch_size: int = 8
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_trainer(self.trainer, "adapter_fit")


@dataclass
class Stage:
    """One training run: the objective (``class_path``/``init_args``; its ``model`` is filled in by
    the protocol), epochs, batch sizes and extra Trainer arguments. ``eval_every_n_epochs`` (an
    unlearning stage) evaluates during training too, for the forget-quality vs utility figure.
    ``sequential`` makes it a schedule of deletion requests (``max_epochs`` is then ignored).
    An ``InfluenceStep`` objective edits a LoRA to remove the forget split (one epoch: the solve is
    its whole training loop): ``adapter_fit``'s, fitted on the target; or, without it, the
    target's own adapter when the protocol's fine-tune is a LoRA (the deployed-adapter setting)."""

    objective: AdaptedModel = field(default_factory=FineTune)
    max_epochs: int = 1
    batch_size: int = 8
    retain_per_forget: int = 1
    trainer: dict[str, Any] = field(default_factory=dict)
    eval_every_n_epochs: int | None = None
    sequential: SequentialSettings | None = None
    adapter_fit: AdapterFit | None = None

    def __post_init__(self) -> None:
        check_at_least(1, "stage", max_epochs=self.max_epochs, batch_size=self.batch_size)
        check_at_least(1, "stage", retain_per_forget=self.retain_per_forget)
        check_at_least(1, "stage", eval_every_n_epochs=self.eval_every_n_epochs)
        check_trainer(self.trainer, "stage")
        if isinstance(self.objective, InfluenceStep):
            if self.adapter_fit is not None and self.adapter_fit.objective.adapter_spec is None:
                raise UserError("adapter_fit.objective needs an adapter (LoRA): InfluenceStep edits one")
            if self.sequential is not None:
                raise UserError("an InfluenceStep stage cannot be sequential")


def check_trainer(settings: dict[str, Any], where: str) -> None:
    """Refuse Trainer settings the protocol cannot honour (it sets ``max_epochs`` from the stage
    and the logger itself) or that ``fit``'s parser would refuse."""
    for key, instead in (("max_epochs", "the stage's max_epochs"), ("logger", "the protocol's logger")):
        if key in settings:
            raise UserError(f"{where}: trainer.{key}: set by the protocol from {instead}")
    trainer_arguments(settings, where)


@dataclass
class EvalSettings(EvaluationSettings):
    """The protocol's ``evaluation:`` section: the ``EvaluationSettings`` every model is evaluated
    with (questions per forward, generation budget, fast mode, closer-look cosine / NLI models),
    plus ``attacks`` that test whether the forgetting holds (``quant8``, ``quant4``, ``relearn``;
    see ``lightning_unlearn.attacks``): each adds ``<attack>_forget_*`` columns, measured on an
    attacked copy of every model. Questions are encoded as in training: ``data.prompt_format``,
    ``data.max_length``."""

    attacks: list[str] = field(default_factory=list)
    relearn: RelearnSettings = field(default_factory=RelearnSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_attacks(self.attacks, "evaluation.attacks")


class Protocol:
    """Runs the TOFU protocol; each model's directory and report are written atomically.

    ``models_from`` names a finished run of the same settings but the objectives (a protocol or
    sweep directory, checked by its ``models.fingerprint``) whose target and retain model this run
    links instead of training its own: new objectives, or tuned recipes, against one target.
    """

    def __init__(
        self,
        name: str,
        model: ModelSpec,
        finetune: Stage,
        objectives: dict[str, Stage],
        data: DataSettings | None = None,
        evaluation: EvalSettings | None = None,
        trainer: dict[str, Any] | None = None,
        out_dir: str = "runs",
        seed: int = 0,
        logger: str = "csv",
        models_from: str | None = None,
    ) -> None:
        reserved = {"finetuned", "retain"} & set(objectives)
        if reserved:
            raise UserError(f"objective names {sorted(reserved)} are reserved for the protocol's own models")
        if logger not in ("csv", "wandb"):
            raise UserError(f"logger must be 'csv' or 'wandb', got {logger!r}")
        deployed = finetune.objective.adapter_spec is not None
        for stage_name, stage in objectives.items():
            if isinstance(stage.objective, InfluenceStep) and stage.adapter_fit is None and not deployed:
                raise UserError(
                    f"objectives.{stage_name}: an InfluenceStep stage edits a LoRA: give it adapter_fit "
                    "(a LoRA fitted on the target), or give finetune.objective an adapter (the "
                    "deployed-adapter setting: the step edits the target's own LoRA)"
                )
        self.name, self.base, self.finetune, self.objectives = name, model, finetune, objectives
        self.data = data or DataSettings()
        self.evaluation = evaluation or EvalSettings()
        self.trainer_args = dict(trainer or {})
        check_trainer(self.trainer_args, "protocol")
        self.run_dir = Path(out_dir) / name
        self.seed, self.logger, self.models_from = seed, logger, models_from
        # What a run learns as it goes: the split files and evaluation records (``prepare_data``),
        # the retain model's references (``prepare_models``), the stages' curves and ledgers.
        self.splits_dir = self.run_dir / "splits"
        self.eval_splits: dict[str, list[dict]] = {}
        self.retain_tr: list[float] | None = None
        self.retain_mia: float | None = None
        self.histories: dict[str, list[dict]] = {}
        self.continual: dict[str, list[dict]] = {}
        self.continual_requests: dict[str, dict[str, list[dict]]] = {}
        # Taken before ``prepare_data`` points a config-built model at the run's generated tokenizer.
        self._models_fingerprint = settings_fingerprint(self.settings(objectives=False))

    # -- data -----------------------------------------------------------------------------------
    def prepare_data(self) -> Path:
        """Resolve the source to a directory of split files (generating the synthetic world)."""
        d = self.data
        if d.source == "synthetic":
            world = processes.rank_zero(lambda: make_world(self.run_dir / "world", d.world))
            if self.base.config is not None and self.base.tokenizer is None:
                self.base = dataclasses.replace(self.base, tokenizer=str(world / "tokenizer"))
            source = world
        else:
            source = Path(d.source) if Path(d.source).exists() else d.source
        forget = load_split(source, d.forget_split)
        retain = load_split(source, d.retain_split)[: d.retain_limit]
        check_disjoint(
            forget, retain, split_where(source, d.forget_split), split_where(source, d.retain_split)
        )
        forget_questions = {r["question"] for r in forget}
        retain = [r for r in retain if r["question"] not in forget_questions]
        # The protocol's own split files (``splits_dir``): what each model trains on, written once.

        def write_splits() -> None:
            with atomic_directory(self.splits_dir) as tmp:
                for split, records in {"full": retain + forget, "retain": retain, "forget": forget}.items():
                    write_text_atomic(tmp / f"{split}.json", "".join(json.dumps(r) + "\n" for r in records))

        processes.rank_zero(write_splits)
        trained = {r["question"] for r in retain} | forget_questions
        self.eval_splits = {}
        for role, split in d.eval_splits.items():
            records = load_split(source, split)
            if role in ("retain", "forget"):
                records = [r for r in records if r["question"] in trained]
            if not records:
                raise UserError(
                    f"evaluation split '{split}' ({role}) has no questions the models were trained on"
                )
            self.eval_splits[role] = records[: d.eval_limit]
        return source

    # -- stages ---------------------------------------------------------------------------------
    def _logger(self, stage: str) -> Logger:
        if self.logger == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            return WandbLogger(
                project="lightning_unlearn", name=f"{self.name}/{stage}", save_dir=str(self.run_dir)
            )
        return CSVLogger(self.run_dir / "logs", name=stage, version=0)

    def _trainer(self, stage_name: str, stage: Stage, callbacks: list | None = None) -> L.Trainer:
        args = {
            "accelerator": "cpu",
            "devices": 1,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "log_every_n_steps": 5,
            "limit_val_batches": 0,  # the protocol evaluates with the Evaluator instead
            **self.trainer_args,
            **stage.trainer,
            **processes.trainer_layout({**self.trainer_args, **stage.trainer}, f"stage '{stage_name}'"),
        }
        # Built anew for every stage from the kept settings (a strategy is bound to one Trainer).
        args = trainer_arguments(args, f"stage '{stage_name}'")
        own = args.pop("callbacks", None) or []  # the config's own callbacks
        own = own if isinstance(own, list) else [own]
        return SafeTrainer(
            max_epochs=stage.max_epochs,
            logger=self._logger(stage_name),
            callbacks=[*(callbacks or []), *own],
            **args,
        )

    def _train(
        self,
        stage_name: str,
        stage: Stage,
        model: ModelSpec,
        datamodule,
        callbacks: list | None = None,
        merge: bool = True,
    ) -> Path:
        """Fit the stage and export its model (an adapter merged in, or kept apart with ``merge``
        False), except a sequential stage's: its model is the fused adapter merged into the target
        (``_export_fused``), not the live adapter slot."""
        directory = self.run_dir / "models" / stage_name
        if directory.is_dir():  # written atomically: a resumed run keeps it
            processes.say(f"[{self.name}] {stage_name}: done before, kept")
            return directory
        processes.say(f"[{self.name}] {stage_name}: training {type(stage.objective).__name__}")
        L.seed_everything(self.seed, verbose=False)
        objective = copy.deepcopy(stage.objective)  # a stage may run twice (target and retain)
        objective.model_spec = model
        trainer = self._trainer(stage_name, stage, callbacks)
        # A preempted stage saves its step here; the rerun (the same command) continues from it.
        preempted = self.run_dir / "preempted" / f"{stage_name}.ckpt"
        preemption_callback(trainer).checkpoint_path = preempted
        resume = str(preempted) if preempted.exists() else None
        if resume:
            processes.say(f"[{self.name}] {stage_name}: resuming from {preempted}")
        trainer.fit(objective, datamodule=datamodule, ckpt_path=resume)
        exported = directory if stage.sequential else objective.export(directory, merge=merge)

        # after rank 0's export: every rank can read it now (a sharded checkpoint is a directory)
        processes.rank_zero(lambda: remove_path(preempted))
        return exported

    def _finetune(self, stage_name: str, split: str) -> Path:
        """The target (``split`` full) or the retain model (``split`` retain). A fine-tune with a
        LoRA (the deployed-adapter setting) keeps its adapter apart in ``<stage_name>_adapter``
        for an InfluenceStep stage to edit, and its model is the base with that adapter merged."""
        dm = FineTuneDataModule(
            tokenizer=self.base.tokenizer_path,
            source=str(self.splits_dir),
            split=split,
            prompt_format=self.data.prompt_format,
            max_length=self.data.max_length,
            batch_size=self.finetune.batch_size,
            seed=self.seed,
        )
        if self.finetune.objective.adapter_spec is None:
            return self._train(stage_name, self.finetune, self.base, dm)
        adapter = self._train(f"{stage_name}_adapter", self.finetune, self.base, dm, merge=False)
        return self._export_fused(stage_name, self.base, adapter)

    def _influence(self, stage_name: str, stage: Stage, target: Path) -> Path:
        """Fit ``adapter_fit``'s LoRA on the target over forget + retain (or, without it, take the
        target's own LoRA: the deployed-adapter setting, where the base never saw the data), then
        remove the forget split from it with the influence step; the row is the model under the
        LoRA (the target, or the base) with the edited LoRA merged."""
        fit = stage.adapter_fit
        if fit is None:
            spec, adapter_dir = self.base, self.run_dir / "models" / "finetuned_adapter"
        else:
            spec = ModelSpec(path=str(target), dtype=self.base.dtype)
            dm = FineTuneDataModule(
                tokenizer=str(target),
                source=str(self.splits_dir),
                split="full",
                prompt_format=self.data.prompt_format,
                max_length=self.data.max_length,
                batch_size=fit.batch_size,
                seed=self.seed,
            )
            fit_stage = Stage(objective=fit.objective, max_epochs=fit.max_epochs, trainer=fit.trainer)
            adapter_dir = self._train(f"{stage_name}_adapter", fit_stage, spec, dm, merge=False)
        step = copy.deepcopy(stage.objective)
        step.adapter_dir = str(adapter_dir)
        edits = InfluenceDataModule(
            tokenizer=str(target),
            source=str(self.splits_dir),
            train_split="full",
            edit="instance_removal",
            removed_split="forget",
            prompt_format=self.data.prompt_format,
            max_length=self.data.max_length,
            batch_size=stage.batch_size,
        )
        return self._train(stage_name, dataclasses.replace(stage, objective=step, max_epochs=1), spec, edits)

    def _unlearn(
        self, stage_name: str, stage: Stage, target: Path, during: UnlearningEvaluation | None = None
    ) -> Path:
        """Unlearn the target with ``stage``. ``during`` (a sweep's) replaces the evaluation during
        training that the stage's own ``eval_every_n_epochs`` would add; its evaluator is the
        protocol's."""
        if isinstance(stage.objective, InfluenceStep):
            return self._influence(stage_name, stage, target)
        dm = UnlearningDataModule(
            tokenizer=str(target),
            source=str(self.splits_dir),
            forget_split="forget",
            retain_split="retain",
            prompt_format=self.data.prompt_format,
            max_length=self.data.max_length,
            batch_size=stage.batch_size,
            retain_per_forget=stage.retain_per_forget,
            refusals=self.data.refusals if stage.objective.needs_refusals else None,
            seed=self.seed,
        )
        spec = ModelSpec(path=str(target), dtype=self.base.dtype)
        callbacks: list = []
        own = during is None and bool(stage.eval_every_n_epochs or stage.sequential)
        history = self.run_dir / "histories" / f"{stage_name}.json"
        if own:
            during = UnlearningEvaluation(
                every_n_epochs=stage.eval_every_n_epochs or 1, history_path=str(history)
            )
        if during is not None:
            during.evaluator = self._evaluator(load_spec_tokenizer(spec), progress=False)
            callbacks.append(during)
        sequential = self._sequential(stage_name, stage.sequential) if stage.sequential else None
        if sequential is not None:
            callbacks.append(sequential)
        unlearned = self._train(stage_name, stage, spec, dm, callbacks)
        if own and stage.eval_every_n_epochs:  # from its file: a resumed run may not have trained it
            self.histories[stage_name] = json.loads(history.read_text())
        if sequential is not None:
            ledger = sequential.dirpath / "ledger.jsonl"
            self.continual[stage_name] = [json.loads(line) for line in ledger.read_text().splitlines()]
            self.continual_requests[stage_name] = {
                r.name: rs for r, rs in zip(sequential.requests, sequential.records, strict=True)
            }
            unlearned = self._export_fused(stage_name, spec, sequential.dirpath / "fused")
        return unlearned

    def _sequential(self, stage_name: str, settings: SequentialSettings) -> SequentialForgetting:
        forget = load_split(self.splits_dir, "forget")
        if not 1 <= settings.requests <= len(forget):
            raise UserError(
                f"objectives.{stage_name}.sequential.requests must be between 1 and the forget split's "
                f"{len(forget)} records, got {settings.requests}"
            )
        size = -(-len(forget) // settings.requests)
        requests = [
            ForgetRequest(name=f"request{k}", ids=[str(r["id"]) for r in forget[k * size : (k + 1) * size]])
            for k in range(settings.requests)
        ]
        return SequentialForgetting(
            str(self.run_dir / "sequential" / stage_name),
            [r for r in requests if r.ids],
            mode=settings.mode,
            epochs_per_request=settings.epochs_per_request,
            ridge=settings.ridge,
            fused_rank=settings.fused_rank,
            seed=self.seed,
        )

    def _export_fused(self, stage_name: str, spec: ModelSpec, fused: Path) -> Path:
        """``spec``'s model with the adapter in ``fused`` merged in: a sequential stage's model
        (the target with the fused adapter), a LoRA fine-tune's (the base with its adapter)."""
        directory = self.run_dir / "models" / stage_name
        if directory.is_dir():
            return directory

        def export() -> None:
            model = load_adapter(load_model(spec), str(fused))
            export_model(directory, model, load_spec_tokenizer(spec), merge=True, in_place=True)

        processes.rank_zero(export)
        return directory

    def _evaluator(
        self,
        tokenizer,
        progress: bool = True,
        splits: dict[str, list[dict]] | None = None,
        retain_truth_ratios: list[float] | None = None,
    ) -> Evaluator:
        """The protocol's evaluation, against the retain model once it is known (``splits`` and
        ``retain_truth_ratios`` replace the protocol's own for an attack's forget-only pass)."""
        return self.evaluation.evaluator(
            tokenizer,
            self.eval_splits if splits is None else splits,
            prompt_format=self.data.prompt_format,
            max_length=self.data.max_length,
            retain_truth_ratios=self.retain_tr if retain_truth_ratios is None else retain_truth_ratios,
            retain_mia_auc=self.retain_mia,
            progress=progress,
        )

    def _evaluate(self, name: str, model_dir: Path) -> Report:
        saved = self.run_dir / "reports" / name / "report.json"
        if saved.is_file():  # written atomically after its model: a resumed run keeps it
            report = Report.load(saved)
            if not saved.parent.is_symlink():  # another run's (``adopt_models``): left as it is
                processes.rank_zero(lambda: report.save(saved.parent))
            return report
        processes.say(f"[{self.name}] {name}: evaluating")
        spec = ModelSpec(path=str(model_dir), dtype=self.base.dtype)
        # Every rank scores its shard of each split; every rank gets the whole report back.
        tokenizer, model = load_spec_tokenizer(spec), load_model(spec)
        report = self._evaluator(tokenizer, progress=processes.rank() == 0).run(model)
        report.settings["model_dir"] = str(model_dir)
        # The retain model's attacks compare against its own truth ratios (it is the reference).
        reference = report.per_sample.get("forget_truth_ratio") if self.retain_tr is None else self.retain_tr
        report.metrics.update(self._attacks(model, tokenizer, reference))
        processes.rank_zero(lambda: report.save(self.run_dir / "reports" / name))
        return report

    def _attacks(self, model, tokenizer, reference: list[float] | None) -> dict[str, float]:
        """``evaluation.attacks`` on a copy of ``model``: each attack's forget metrics as columns,
        forget_quality against ``reference`` (the retain model's forget truth ratios)."""
        if not self.evaluation.attacks or "forget" not in self.eval_splits:
            return {}

        def forget_metrics(attacked, records: list[dict], reference: list[float] | None) -> dict[str, float]:
            evaluator = self._evaluator(tokenizer, False, {"forget": records}, reference)
            return evaluator.run(attacked).metrics

        return attack_metrics(
            model, self.evaluation.attacks, self.eval_splits["forget"], forget_metrics, reference,
            tokenizer, self.data.prompt_format, self.data.max_length, self.evaluation.relearn, self.seed,
        )  # fmt: skip

    def settings(self, objectives: bool = True) -> dict[str, Any]:
        """What a run's results depend on. Fingerprints take them without the objectives (a run's
        ``settings.fingerprint`` and ``models.fingerprint``; a sweep replaces the objectives trial
        by trial), and each objective is fingerprinted on its own (``stages/<name>.fingerprint``)."""
        names = (
            ("base", "finetune", "objectives", "data", "evaluation")
            if objectives
            else ("base", "finetune", "data", "evaluation")
        )
        settings = {k: getattr(self, k) for k in names}
        return {**settings, "trainer": self.trainer_args, "seed": self.seed}

    def _claim_run_dir(self) -> None:
        """Resume only a run of these very settings, else stop before touching anything (a changed
        config needs another name). ``settings.fingerprint`` holds every setting but the
        objectives; each objective has its own (``stages/<name>.fingerprint``, written when it
        starts), so adding an objective to a run trains only that one, and changing one that
        already ran is refused."""
        processes.rank_zero(lambda: self._claim(self.models_fingerprint()))

    def _claim(self, fingerprint: str) -> None:
        marker = self.run_dir / "settings.fingerprint"
        if marker.is_file() and marker.read_text().strip() == fingerprint:
            changed = [n for n, stage in self.objectives.items() if self._stage_changed(n, stage)]
            if changed:
                raise UserError(
                    f"{self.run_dir}: objective '{changed[0]}' ran there with other settings: give "
                    "the changed objective another name, or delete that directory"
                )
            print(f"[{self.name}] resuming {self.run_dir}: finished stages are kept", flush=True)
            return
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise UserError(
                f"{self.run_dir} holds a run of other settings (or one from before resumable runs): "
                "give the protocol another name or out_dir, or delete that directory"
            )
        write_text_atomic(marker, fingerprint + "\n")

    def _stage_marker(self, name: str) -> Path:
        return self.run_dir / "stages" / f"{name}.fingerprint"

    def _claim_stage(self, name: str, stage: Stage) -> None:
        write_text_atomic(self._stage_marker(name), settings_fingerprint(stage) + "\n")

    def _stage_changed(self, name: str, stage: Stage) -> bool:
        marker = self._stage_marker(name)
        return marker.is_file() and marker.read_text().strip() != settings_fingerprint(stage)

    def run(self) -> dict[str, Report]:
        """Run every stage and return the reports by model name; also writes report.json/.md.
        Lightning's per-stage notices are silenced (``quiet_libraries``); real warnings show."""
        processes.join(str(self.trainer_args.get("accelerator", "cpu")))
        with quiet_libraries():
            return self._run()

    def _run(self) -> dict[str, Report]:
        start = time.perf_counter()
        source = None if self.models_from is None else self.models_source(self.models_from, "models_from")
        self._claim_run_dir()
        if source is not None:
            processes.rank_zero(lambda: self.adopt_models(source))
        target, reports = self.prepare_models()
        retain_report = reports["retain"]
        self.histories, self.continual, self.continual_requests = {}, {}, {}
        for name, stage in self.objectives.items():
            check_preempted()  # a signal while a stage was finishing: stop before the next one
            processes.rank_zero(functools.partial(self._claim_stage, name, stage))
            unlearned = self._unlearn(name, stage, target)
            reports[name] = self._evaluate(name, unlearned)
        processes.rank_zero(lambda: self._write_outputs(reports, retain_report, start))
        return reports

    def _write_outputs(self, reports: dict[str, Report], retain_report: Report, start: float) -> None:
        """report.json, report.md, the figures and the printed table (on rank 0)."""
        table = metrics_table({n: r.metrics for n, r in reports.items()}, self._columns(reports))
        write_text_atomic(
            self.run_dir / "report.json",
            json.dumps({n: r.to_dict() for n, r in reports.items()}, indent=1) + "\n",
        )
        write_text_atomic(self.run_dir / "report.md", table + "\n")
        truth_ratios = {
            n: r.per_sample["forget_truth_ratio"]
            for n, r in reports.items()
            if "forget_truth_ratio" in r.per_sample
        }
        if truth_ratios:
            quality = {
                n: r.metrics["forget_quality"] for n, r in reports.items() if "forget_quality" in r.metrics
            }
            truth_ratio_cdfs(truth_ratios, self.run_dir / "truth_ratios.png", quality)
        if self.histories:
            write_text_atomic(self.run_dir / "history.json", json.dumps(self.histories, indent=1) + "\n")
            forget_quality_vs_utility(
                self.histories, self.run_dir / "fq_vs_mu.png", retain_report.metrics.get("model_utility")
            )
        if self.continual:
            self._continual_report(reports["finetuned"])
        print(table)
        print(
            f"[{self.name}] done in {time.perf_counter() - start:.0f} s; report: {self.run_dir / 'report.json'}"
        )

    def prepare_models(self) -> tuple[Path, dict[str, Report]]:
        """The data, the retain model and the target, each trained and evaluated once (a resumed
        run keeps them); returns the target's directory and both reports. Sets the retain
        references (truth ratios, MIA AUC) every later evaluation compares against."""
        self.prepare_data()
        retain_dir = self._finetune("retain", "retain")
        self.retain_tr = self.retain_mia = None
        retain_report = self._evaluate("retain", retain_dir)
        self.retain_tr = retain_report.per_sample.get("forget_truth_ratio")
        self.retain_mia = retain_report.metrics.get("mia_min_k")
        if self.retain_tr is not None:
            retain_report.metrics["forget_quality"] = forget_quality(self.retain_tr, self.retain_tr)
        if self.retain_mia is not None:
            retain_report.metrics["privleak"] = 0.0  # the reference itself, by definition
        target = self._finetune("finetuned", "full")
        reports = {"finetuned": self._evaluate("finetuned", target), "retain": retain_report}
        marker = self.run_dir / MODELS_MARKER
        processes.rank_zero(lambda: write_text_atomic(marker, self.models_fingerprint() + "\n"))
        return target, reports

    def models_fingerprint(self) -> str:
        """What the target, the retain model and their reports depend on: every setting but the
        objectives (another run of these settings may use them instead of fine-tuning its own)."""
        return self._models_fingerprint

    def models_source(self, source: str | Path, where: str) -> Path:
        """``source``, a finished protocol or sweep run, checked to hold a target and a retain
        model of these very settings (all but the objectives: its ``models.fingerprint``)."""
        source = Path(source).resolve()
        marker = source / MODELS_MARKER
        if not marker.is_file():
            raise UserError(
                f"{where}: {source} has no {MODELS_MARKER} (not a run whose target and "
                "retain model are finished, or one made before runs recorded it)"
            )
        if marker.read_text().strip() != self.models_fingerprint():
            raise UserError(
                f"{where}: {source} was made with other model, fine-tune, data or "
                "evaluation settings than this protocol's"
            )
        for part in ADOPTED:
            if not (source / part).is_dir():
                raise UserError(f"{where}: {source / part} is missing")
        return source

    def adopt_models(self, source: Path) -> None:
        """Use the target and the retain model (and their reports) of the run in ``source``
        (checked by ``models_source``), so the sweeps of several objectives start from one target
        instead of fine-tuning one each. They are linked, not copied (a full fine-tune is the
        model's size), so ``source`` must stay where it is."""
        for part in ADOPTED + ADOPTED_IF_PRESENT:
            link, target = self.run_dir / part, source / part
            if not target.is_dir() or link.is_symlink():  # no LoRA fine-tune; or linked by a rerun
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target, target_is_directory=True)

    def _continual_report(self, target: Report) -> None:
        """Per sequential stage and step: each request's forget quality so far and model utility
        (continual.md, continual.json, continual.png); step 0 is the target before any request."""
        write_text_atomic(self.run_dir / "continual.json", json.dumps(self.continual, indent=1) + "\n")
        sections = []
        for name, ledger in self.continual.items():
            requests = self.continual_requests[name]
            before = request_metrics(target, self.eval_splits.get("forget", []), self.retain_tr, requests)
            before["model_utility"] = target.metrics.get("model_utility")
            before = {f"eval/{k}": v for k, v in before.items()}
            sections.append(continual_table(name, ledger, before))
        write_text_atomic(self.run_dir / "continual.md", "\n\n".join(sections) + "\n")
        continual_forgetting(self.continual, self.run_dir / "continual.png")
        print("\n\n".join(sections))

    @staticmethod
    def _columns(reports: dict[str, Report]) -> list[str]:
        present = {name for r in reports.values() for name in r.metrics}
        return [c for c in TABLE_COLUMNS if c in present]
