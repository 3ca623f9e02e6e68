"""``fit`` resumes by itself: rerunning the same command after a kill continues from the last
finished epoch instead of starting over.

Each epoch's end writes ``last.ckpt`` (atomically) to ``runs/resume/<fingerprint>/``, where the
fingerprint is a hash of the whole resolved config: the same command finds its own checkpoint, and
a changed config (another learning rate, another forget split) starts fresh instead of resuming
a different run. The data order is a function of (seed, epoch) only and the checkpoint holds the
adapter, the optimiser and scheduler states and the loop counters, so the resumed run ends with
the uninterrupted run's weights; a SIGKILL mid-epoch repeats that epoch's steps from its start.
A preemption signal (SIGTERM, SLURM's USR1) instead writes ``last.ckpt`` at the current step, the
train loader's position included, and the rerun repeats nothing (``preemption``).

Left out: runs with ``enable_checkpointing: false``, runs that bring their own ``ModelCheckpoint``
(give ``--ckpt_path`` yourself), an explicit ``--ckpt_path``, and ``SequentialForgetting``, which
resumes request by request from its own ledger.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import re
import types
from pathlib import Path
from typing import Any

from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lightning_unlearn.preemption import preemption_callback
from lightning_unlearn.safe_load import SafeCheckpointCLI

RESUME_FILE = "last"


def config_fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a resolved config, without the keys that name files, not settings."""
    return _digest({k: v for k, v in config.items() if k not in ("config", "ckpt_path")})


def _digest(value: Any) -> str:
    """The first 16 hex digits of the sha256 of ``value`` as sorted JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of settings built in Python (dataclasses, objectives, optimiser
    factories and their closures) that is the same in every process that builds the same
    settings: what the protocol fingerprints to know a run directory is its own. Plain objects
    are described by their public attributes down to ``depth`` 8 (a cycle ends there), then by
    their repr without addresses.

    A dataclass field or an objective's attribute left at its constructor's default is left out:
    a release that adds a setting (at a default that keeps the old behaviour) then leaves earlier
    runs resumable. The fingerprint covers what the user chose; the code, its defaults included,
    is the release's, as the losses themselves are."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): describe(v, depth) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [describe(v, depth) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: describe(getattr(value, f.name), depth)
            for f in dataclasses.fields(value)
            if not _is_default(getattr(value, f.name), f.default)
        }
        return {"type": _name(type(value)), **fields}
    if isinstance(value, functools.partial):
        return {
            "partial": describe(value.func, depth),
            "args": describe(value.args, depth),
            "kwargs": describe(value.keywords, depth),
        }
    if isinstance(value, types.ModuleType):
        return {"module": value.__name__}
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        cells = (getattr(value, "__closure__", None) or ()) if depth < 8 else ()
        return {"callable": _name(value), "closure": [describe(c.cell_contents, depth + 1) for c in cells]}
    if hasattr(value, "__dict__") and depth < 8:  # an objective: its public settings, not its weights
        defaults = _init_defaults(type(value))
        public = {
            k: v
            for k, v in vars(value).items()
            if not k.startswith("_") and k not in _STATE and not _is_default(v, defaults.get(k, _NONE))
        }
        return {"type": _name(type(value)), **{k: describe(v, depth + 1) for k, v in sorted(public.items())}}
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))


# Attributes of an objective that are state filled in while it runs, not settings.
_STATE = {"model", "reference_model", "reference_cache", "training", "model_spec"}


_NONE = object()  # no default


@functools.cache
def _init_defaults(cls: type) -> dict[str, Any]:
    """Each constructor parameter's default, the most derived class's first (SimNPO's own
    ``forget_weight`` over the base's): the value an attribute of that name holds when unset."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if not isinstance(init, types.FunctionType):
            continue
        for name, param in inspect.signature(init).parameters.items():
            if param.default is not inspect.Parameter.empty:
                defaults.setdefault(name, param.default)
    return defaults


def _is_default(value: Any, default: Any) -> bool:
    """Whether a plain value equals its default: None, a bool or a string of the same type, or a
    number of equal value (YAML's ``0`` for a float default is that default; ``True`` is not 1)."""
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return isinstance(value, bool) == isinstance(default, bool) and value == default
    return type(value) is type(default) and isinstance(value, (type(None), str)) and value == default


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def settings_fingerprint(value: Any) -> str:
    """The same short hash as ``config_fingerprint``, of ``describe(value)``."""
    return _digest(describe(value))


class UnlearnCLI(SafeCheckpointCLI):
    """LightningCLI (loading checkpoints weights-only) whose ``fit`` checkpoints every epoch and
    resumes from that checkpoint."""

    resume_dir: Path | None = None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        self.resume_dir = None
        root = Path(config.get("default_root_dir") or ".")
        fitting = self.subcommand == "fit"  # None when the CLI only builds (run=False)
        run_dir = (
            root / "runs" / "resume" / config_fingerprint(self.config["fit"].as_dict()) if fitting else None
        )
        wanted = fitting and config.get("enable_checkpointing", True) is not False
        configured = config.get("callbacks") or []
        given = [*callbacks, *(configured if isinstance(configured, list) else [configured])]
        if wanted and not any(_owns_resume(c) for c in given):
            self.resume_dir = run_dir
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
        trainer = super()._instantiate_trainer(config, callbacks)
        if fitting:
            self._preempt_to(trainer, run_dir)
        return trainer

    def _preempt_to(self, trainer: Trainer, run_dir: Path) -> None:
        """Where a preempted fit saves its step: our own resume checkpoint when this command resumes
        by itself (the rerun is the same command), else ``preempted.ckpt`` beside it, which the
        rerun names with ``--ckpt_path``."""
        preemption = preemption_callback(trainer)
        if self.resume_dir is not None:
            preemption.checkpoint_path = self.resume_dir / f"{RESUME_FILE}.ckpt"
        else:
            preemption.checkpoint_path = run_dir / "preempted.ckpt"
            preemption.extra = ["--ckpt_path", str(preemption.checkpoint_path)]

    def before_fit(self) -> None:
        settings = self.config_init[self.subcommand]
        if self.resume_dir is None or settings.get("ckpt_path") is not None:
            return
        last = self.resume_dir / f"{RESUME_FILE}.ckpt"
        if last.exists():  # a file, or a directory (a sharded checkpoint)
            rank_zero_info(f"resuming from {last} (the same config ran before; delete it to start over)")
            settings["ckpt_path"] = str(last)


def _owns_resume(callback: Any) -> bool:
    """A callback that checkpoints or resumes by itself (ours would fight it)."""
    from lightning_unlearn.callbacks import SequentialForgetting

    return isinstance(callback, (ModelCheckpoint, SequentialForgetting))
