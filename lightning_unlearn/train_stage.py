"""One training stage of a benchmark run (fine-tune a target, train a retrained model, unlearn):
an objective with its epochs and batch size, trained once into an exported model directory that
a rerun of the same command keeps (``wmdp_run.py``, ``muse_run.py``)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_unlearn.data.datamodule import check_at_least
from lightning_unlearn.models import ModelSpec
from lightning_unlearn.objectives import FineTune, UnlearningObjective
from lightning_unlearn.safe_load import SafeTrainer


@dataclass
class TrainStage:
    """An objective (its ``model`` is filled in by the run), epochs or steps, batch size and
    extra Trainer arguments (``max_steps`` > 0 stops earlier than ``max_epochs``, as WMDP's RMU
    stops after ``max_num_batches``)."""

    objective: UnlearningObjective = field(default_factory=FineTune)
    max_epochs: int = 1
    max_steps: int = -1
    batch_size: int = 4
    retain_per_forget: int = 1
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_at_least(1, "stage", max_epochs=self.max_epochs, batch_size=self.batch_size)
        check_at_least(1, "stage", retain_per_forget=self.retain_per_forget)


def train_stage(
    run_dir: Path,
    stage_name: str,
    stage: TrainStage,
    spec: ModelSpec,
    datamodule,
    seed: int = 0,
    trainer_args: dict[str, Any] | None = None,
) -> Path:
    """Train ``stage`` from ``spec`` and export it to ``run_dir/models/<stage_name>``; an exported
    directory (written atomically) is kept as it is."""
    directory = run_dir / "models" / stage_name
    if directory.is_dir():
        print(f"[{run_dir.name}] {stage_name}: done before, kept", flush=True)
        return directory
    print(f"[{run_dir.name}] {stage_name}: training {type(stage.objective).__name__}", flush=True)
    L.seed_everything(seed, verbose=False)
    objective = copy.deepcopy(stage.objective)
    objective.model_spec = spec
    args = {
        "accelerator": "cpu", "devices": 1, "enable_checkpointing": False, "enable_model_summary": False,
        "log_every_n_steps": 5, "limit_val_batches": 0, **(trainer_args or {}), **stage.trainer,
    }  # fmt: skip
    trainer = SafeTrainer(
        max_epochs=stage.max_epochs,
        max_steps=stage.max_steps,
        logger=CSVLogger(run_dir / "logs", name=stage_name, version=0),
        **args,
    )
    trainer.fit(objective, datamodule=datamodule)
    return objective.export(directory)


def with_generated_tokenizer(base: ModelSpec, generated: bool, run_dir: Path) -> ModelSpec:
    """``base`` with the tokenizer of the miniature generated in ``run_dir / "world"`` when the run
    uses that set and builds its model from a config without naming a tokenizer (the demos)."""
    if generated and base.config is not None and base.tokenizer is None:
        return dataclasses.replace(base, tokenizer=str(run_dir / "world" / "tokenizer"))
    return base
