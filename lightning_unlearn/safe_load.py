"""Loading files a user hands us without running code from them.

A pickle can import and call anything while it loads, so a downloaded ``.ckpt``, ``.pt`` or
``adapter_model.bin`` could run a command on the machine. We read tensors through safetensors,
and anything that must go through ``torch.load`` with ``weights_only=True`` (tensors, numbers,
strings and plain containers only), passed explicitly so the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
environment variable cannot turn it off. A file that needs more is refused with one line naming it.

``SafeTrainer`` applies this to Lightning checkpoints (``fit --ckpt_path``), and
``SafeCheckpointCLI`` is a LightningCLI that uses it. Lightning 2.6 passes
``weights_only=None`` to ``torch.load`` unless told otherwise (safe on torch >= 2.6 only by default,
and a default an environment variable can flip), and a sharded (distributed-checkpoint) directory
is read partly with plain ``pickle.load`` (its ``.metadata``) and ``torch.load(weights_only=False)``
(non-tensor entries): ``SafeTrainer`` checks ``.metadata`` with an allow-list unpickler first and
forces weights-only loading for the rest.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.core.datamodule import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, TRAIN_DATALOADERS
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from lightning_unlearn.errors import UserError

RESAVE_HINT = "if you made it yourself, save its tensors with safetensors (or torch.save of tensors only)"
# What a torch.distributed.checkpoint ``.metadata`` pickle may name: the metadata dataclasses and
# enums, where the storage lives, tensor shapes, dtypes and layouts, and paths.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
# A Lightning checkpoint path that names no file: resolved by Lightning to one it wrote.
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def _blocked_global(err: BaseException) -> str | None:
    """The import a refused pickle asked for (torch names it as ``GLOBAL module.name``)."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def refusal(path: str | Path, err: BaseException) -> str:
    """The one-line message for a pickle that ``weights_only`` loading refused."""
    wanted = _blocked_global(err)
    what = f"would import {wanted}" if wanted else "holds more than tensors and plain values"
    return (
        f"refusing to load '{path}': it is a pickle that {what}, and unpickling it could run code "
        f"(only tensors and plain containers are loaded); {RESAVE_HINT}"
    )


@contextlib.contextmanager
def load_errors(path: _PATH | None) -> Iterator[None]:
    """Around one weights-only ``torch.load`` of ``path``: a refused pickle, or a file that is not
    a torch file at all, becomes a UserError naming ``path``."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise UserError(refusal(str(path), err)) from None
    except torch.OutOfMemoryError:
        raise
    except FileNotFoundError:
        raise UserError(f"'{path}' does not exist") from None
    except (EOFError, KeyError, RuntimeError, ValueError, OSError) as err:
        # an empty, truncated or foreign file: torch reports it as any of these
        raise UserError(
            f"'{path}' is not a PyTorch file torch.load can read ({type(err).__name__})"
        ) from None


def torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure a UserError naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist")
    with load_errors(path):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """A safetensors file's tensors (no code runs), with a damaged file a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"'{path}' is not a readable safetensors file ({err})") from None


def tensor_names(path: str | Path) -> set[str]:
    """The tensor names in a safetensors file, read from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    except (SafetensorError, OSError) as err:
        raise UserError(f"'{path}' is not a readable safetensors file ({err})") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's ``.metadata``, importing nothing outside the allow-list."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = module in _DCP_MODULES or (module, name) in _DCP_GLOBALS
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        found = super().find_class(module, name)
        if module in _DCP_MODULES and getattr(found, "__module__", None) != module:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return found


def check_checkpoint(path: _PATH | None) -> None:
    """Refuse a local checkpoint whose loading would unpickle more than tensors and plain values.

    A file is left to the weights-only load itself. A sharded checkpoint directory (written by
    torch.distributed.checkpoint, e.g. FSDP2 under ModelParallelStrategy) has a ``.metadata``
    that torch reads with plain ``pickle.load``: it is unpickled here first with an allow-list,
    and Lightning's ``meta.pt`` beside it is loaded weights-only.
    """
    if path is None or str(path) in _SPECIAL_CKPT_PATHS or "://" in str(path):
        return
    directory = Path(path)
    if not directory.is_dir():
        return
    metadata = directory / ".metadata"
    if metadata.is_file():
        try:
            with metadata.open("rb") as handle:
                _MetadataUnpickler(handle).load()
        except pickle.UnpicklingError as err:
            raise UserError(refusal(metadata, err)) from None
        except (EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as err:
            raise UserError(
                f"'{metadata}' is not a distributed-checkpoint metadata file ({type(err).__name__})"
            ) from None
    if (directory / "meta.pt").is_file():
        torch_load(directory / "meta.pt")


@contextlib.contextmanager
def weights_only_everywhere() -> Iterator[None]:
    """Every ``torch.load`` in this block is weights-only, even one that asks for
    ``weights_only=False`` (torch.distributed.checkpoint does, for non-tensor entries)."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


@contextlib.contextmanager
def trainable_only_sharded_load() -> Iterator[None]:
    """Let Lightning's sharded (FSDP2 distributed) checkpoint load skip the keys the checkpoint
    does not hold. Our objectives save their trainable tensors only (``on_save_checkpoint``) and
    load non-strictly, but Lightning 2.6 asks torch.distributed.checkpoint for every key of the
    model, frozen base included, and fails; with a partial load the frozen weights keep the values
    the model was built with, which is what a file checkpoint's non-strict load does."""
    import lightning.fabric.strategies.model_parallel as model_parallel
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint import load as dcp_load

    def partial_load(state: dict[str, Any], path: Path) -> None:
        dcp_load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))

    original = model_parallel._distributed_checkpoint_load
    model_parallel._distributed_checkpoint_load = partial_load
    try:
        yield
    finally:
        model_parallel._distributed_checkpoint_load = original


class SafeTrainer(L.Trainer):
    """A Lightning Trainer that loads checkpoints (``ckpt_path``) as weights only.

    Our objectives' checkpoints hold tensors, numbers, strings and plain containers, so they load
    this way; a checkpoint that needs more (a pickled object) is refused with a UserError naming
    it, before any of its code could run. ``weights_only=False`` is refused too. The same
    arguments as ``Trainer``; ``weights_only`` defaults to True.

    It also stops cleanly on preemption (SIGTERM, SLURM's requeue signal): see ``preemption``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from lightning_unlearn.preemption import install

        install(self)

    def _guard(self, weights_only: bool | None) -> None:
        if weights_only is False:
            raise UserError(
                "weights_only=False would unpickle arbitrary objects from the checkpoint (and run "
                "their code); lightning-unlearn loads checkpoints as weights only"
            )
        strategy = self.strategy
        if getattr(strategy, "_lightning_unlearn_safe", False):
            return
        load = strategy.load_checkpoint

        def load_checkpoint(checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
            check_checkpoint(checkpoint_path)
            try:
                with weights_only_everywhere(), trainable_only_sharded_load():
                    return load(checkpoint_path, weights_only=True)
            except pickle.UnpicklingError as err:
                raise UserError(refusal(str(checkpoint_path), err)) from None
            except FileNotFoundError:
                raise UserError(f"checkpoint '{checkpoint_path}' does not exist") from None

        # the strategy is the one place every checkpoint path arrives resolved ("last" included)
        strategy.load_checkpoint = load_checkpoint
        strategy._lightning_unlearn_safe = True

    def fit(
        self,
        model: L.LightningModule,
        train_dataloaders: TRAIN_DATALOADERS | LightningDataModule | None = None,
        val_dataloaders: EVAL_DATALOADERS | None = None,
        datamodule: LightningDataModule | None = None,
        ckpt_path: _PATH | None = None,
        weights_only: bool | None = True,
    ) -> None:
        """``Trainer.fit``, resuming from ``ckpt_path`` as weights only. Without one, a
        ``SequentialForgetting`` callback's preempted request (its ``preempted.ckpt``) resumes."""
        self._guard(weights_only)
        if ckpt_path is None:
            ckpt_path = _sequential_resume(self)
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only=True)

    def validate(
        self,
        model: L.LightningModule | None = None,
        dataloaders: EVAL_DATALOADERS | LightningDataModule | None = None,
        ckpt_path: _PATH | None = None,
        verbose: bool = True,
        datamodule: LightningDataModule | None = None,
        weights_only: bool | None = True,
    ) -> list[dict[str, float]]:
        """``Trainer.validate``, loading ``ckpt_path`` as weights only."""
        self._guard(weights_only)
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only=True)

    def test(
        self,
        model: L.LightningModule | None = None,
        dataloaders: EVAL_DATALOADERS | LightningDataModule | None = None,
        ckpt_path: _PATH | None = None,
        verbose: bool = True,
        datamodule: LightningDataModule | None = None,
        weights_only: bool | None = True,
    ) -> list[dict[str, float]]:
        """``Trainer.test``, loading ``ckpt_path`` as weights only."""
        self._guard(weights_only)
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only=True)

    def predict(
        self,
        model: L.LightningModule | None = None,
        dataloaders: EVAL_DATALOADERS | LightningDataModule | None = None,
        datamodule: LightningDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: _PATH | None = None,
        weights_only: bool | None = True,
    ) -> Any:
        """``Trainer.predict``, loading ``ckpt_path`` as weights only."""
        self._guard(weights_only)
        return super().predict(
            model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only=True
        )


def _sequential_resume(trainer: L.Trainer) -> str | None:
    """The checkpoint of the request a ``SequentialForgetting`` run was preempted in, if any."""
    from lightning_unlearn.callbacks.sequential import SequentialForgetting

    for callback in trainer.callbacks:
        if isinstance(callback, SequentialForgetting) and callback.resume_checkpoint() is not None:
            rank_zero_info(f"resuming the preempted request from {callback.checkpoint_path}")
            return str(callback.checkpoint_path)
    return None


class SafeCheckpointCLI(LightningCLI):
    """LightningCLI with ``SafeTrainer`` as its trainer. Lightning 2.6's CLI also reads
    ``--ckpt_path`` itself, in ``__init__``, for the hyperparameters stored in it (weights-only,
    so safe); here a refused or unreadable file ends in one line naming it, as in the Trainer,
    and a sharded checkpoint directory is checked before anything reads it."""

    def __init__(self, *args: Any, trainer_class: type[L.Trainer] = SafeTrainer, **kwargs: Any) -> None:
        super().__init__(*args, trainer_class=trainer_class, **kwargs)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        check_checkpoint(ckpt_path)
        with load_errors(ckpt_path):
            super()._parse_ckpt_path()
