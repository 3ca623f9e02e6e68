"""``fit`` resumes by itself: rerunning the same command after a kill continues from the last
finished epoch instead of starting over.

Each epoch's end writes ``last.ckpt`` (atomically) to ``runs/resume/<fingerprint>/``, where the
fingerprint is a hash of the whole resolved config: the same command finds its own checkpoint, and
a changed config (another learning rate, another forget split) starts fresh instead of resuming
a different run. The data order is a function of (seed, epoch) only and the checkpoint holds the
adapter, the optimiser and scheduler states and the loop counters, so the resumed run ends with
the uninterrupted run's weights; a kill mid-epoch repeats that epoch's steps from its start.

Left out: runs with ``enable_checkpointing: false``, runs that bring their own ``ModelCheckpoint``
(give ``--ckpt_path`` yourself), an explicit ``--ckpt_path``, and ``SequentialForgetting``, which
resumes request by request from its own ledger.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

RESUME_FILE = "last"


def config_fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a resolved config, without the keys that name files, not settings."""
    settings = {k: v for k, v in config.items() if k not in ("config", "ckpt_path")}
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class UnlearnCLI(LightningCLI):
    """LightningCLI whose ``fit`` checkpoints every epoch and resumes from that checkpoint."""

    resume_dir: Path | None = None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        self.resume_dir = None
        wanted = self.subcommand == "fit" and config.get("enable_checkpointing", True) is not False
        given = list(callbacks) + list(config.get("callbacks") or [])
        if wanted and not any(_owns_resume(c) for c in given):
            root = Path(config.get("default_root_dir") or ".")
            self.resume_dir = (
                root / "runs" / "resume" / config_fingerprint(self.config[self.subcommand].as_dict())
            )
            callbacks = [
                *callbacks,
                ModelCheckpoint(
                    dirpath=self.resume_dir,
                    filename=RESUME_FILE,
                    save_top_k=1,
                    enable_version_counter=False,
                    save_on_train_epoch_end=True,
                ),
            ]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        settings = self.config_init[self.subcommand]
        if self.resume_dir is None or settings.get("ckpt_path") is not None:
            return
        last = self.resume_dir / f"{RESUME_FILE}.ckpt"
        if last.is_file():
            rank_zero_info(f"resuming from {last} (the same config ran before; delete it to start over)")
            settings["ckpt_path"] = str(last)


def _owns_resume(callback: Any) -> bool:
    """A callback that checkpoints or resumes by itself (ours would fight it)."""
    from lightning_unlearn.callbacks import SequentialForgetting

    return isinstance(callback, (ModelCheckpoint, SequentialForgetting))
