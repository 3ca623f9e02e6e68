"""InfluenceStep: LLMEraser's training-free edit of a fine-tuned LoRA adapter.

No gradient training: ``Trainer.fit`` runs one training step, which solves (H + damping I) v = b
for the edit the data module provides (``InfluenceDataModule``), sets theta = theta_hat + v on
the adapter and stops. Running it inside ``fit`` gives the edit what every objective has: the
CLI and YAML configs, DDP (each rank takes its shard of the training and edited rows and the
solver all-reduces its partial sums), loggers and the progress bar. The solver's iterations drive
a progress bar and are logged as ``influence/relative_residual`` at step = iteration. At the end
of fit rank 0 writes ``out_dir``: the edited adapter (peft format), its tokenizer and
``summary.json``, in one atomic step.

The solve runs without autocast whatever the trainer's precision: second derivatives in bf16 are
noise. Its precision is the adapter's dtype, at least float32.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm

from lightning_unlearn.errors import UserError
from lightning_unlearn.influence import (
    EDIT_KINDS,
    LAYERWISE_METHODS,
    Edit,
    InfluenceError,
    all_reduce_sum,
    apply_delta,
    check_options,
    influence_delta,
)
from lightning_unlearn.models import ModelSpec, load_adapter, load_model
from lightning_unlearn.objectives.adapted import AdaptedModel

# Options the step supplies itself, so a config may not set them.
RESERVED_OPTIONS = ("on_step", "batch_hvps")


class _Progress:
    """The solver's ``on_step``: a tqdm bar (rank 0, when the trainer shows progress) and the
    relative residual of each iteration sent to every logger (loggers write on rank 0 only)."""

    def __init__(self, module: InfluenceStep, total: int | None) -> None:
        trainer = module.trainer
        show = trainer.progress_bar_callback is not None and trainer.is_global_zero
        self.loggers = module.loggers
        self.bar = tqdm(total=total, desc=f"influence solve ({module.method})", unit="it", disable=not show)

    def __call__(self, iteration: int, residual: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(residual=f"{residual:.2e}", refresh=False)
        for logger in self.loggers:
            logger.log_metrics({"influence/relative_residual": residual}, step=iteration)

    def close(self) -> None:
        self.bar.close()


class InfluenceStep(AdaptedModel):
    """theta = theta_hat + (H + damping I)^-1 b on a fine-tuned LoRA adapter, for one edit.

    Args:
        model: the base model the adapter was fine-tuned on; may be set after construction
            (``model_spec``, as the protocol does), before ``configure_model``.
        adapter_dir: the fine-tuned adapter theta_hat (peft format), loaded trainable: its
            parameters are the ones edited.
        edit: ``instance_removal``, ``query_modification`` or ``response_correction``; must match
            the data module's (None: whatever the data provides).
        damping: lambda. Makes H + lambda I positive definite where the loss is not convex; if the
            adapter was trained with an L2 penalty (lambda/2)||theta||^2, that same lambda makes
            the step the exact Newton step of the penalised loss.
        method: ``cg`` (conjugate gradient, full-batch HVPs), ``stochastic`` (LLMEraser's
            mini-batch quadratic program), ``lissa`` (LiSSA on mini-batch HVPs), ``exact`` (dense
            Hessian: tiny adapters and tests), or the layer-wise ones that need one or two plain
            passes and no HVP: ``kfac``, ``ekfac`` (Kronecker-factored Gauss-Newton per LoRA factor)
            and ``datainf`` (DataInf's closed form). See docs/influence.md.
        tol, max_iter: stopping rule of ``cg`` and ``stochastic`` (None: the solver's default).
        solver_options: any other option of ``lightning_unlearn.influence.solve`` for the method
            (``lr``, ``momentum``, ``seed``, ``average``, ``power_iters`` for stochastic;
            ``scale``, ``repeats`` for lissa; ``max_dim`` for exact; ``fisher``, ``mc_samples``,
            ``max_batches``, ``residual`` for kfac/ekfac; ``max_batches``, ``residual`` for datainf).
        out_dir: where rank 0 writes the edited adapter and ``summary.json`` when fit ends; None
            writes nothing (call ``export``).
    """

    # One step that is the whole solve: a preemption signal stops it at once (nothing is written
    # until it finishes; the rerun solves again) instead of waiting for the step to end.
    saves_mid_epoch = False

    def __init__(
        self,
        model: ModelSpec | None = None,
        adapter_dir: str | None = None,
        edit: str | None = None,
        damping: float = 0.01,
        method: str = "cg",
        tol: float | None = None,
        max_iter: int | None = None,
        solver_options: dict[str, Any] | None = None,
        out_dir: str | None = None,
    ) -> None:
        super().__init__(model)
        self.automatic_optimization = False
        if edit is not None and edit not in EDIT_KINDS:
            raise UserError(f"edit must be one of {', '.join(EDIT_KINDS)}, got {edit!r}")
        options = dict(solver_options or {})
        reserved = sorted(set(options) & set(RESERVED_OPTIONS))
        if reserved:
            raise UserError(f"solver_options: {', '.join(reserved)} is set by InfluenceStep itself")
        options.update({k: v for k, v in [("tol", tol), ("max_iter", max_iter)] if v is not None})
        check_options(method, damping, options)
        self.adapter_dir, self.edit_kind, self.damping, self.method = adapter_dir, edit, damping, method
        self.options, self.out_dir = options, out_dir
        self.summary: dict[str, Any] | None = None

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.model_spec is None:
            raise UserError("InfluenceStep: no model given (the base model the adapter was fine-tuned on)")
        if self.adapter_dir is None:
            raise UserError("InfluenceStep: no adapter_dir given (the fine-tuned LoRA adapter to edit)")
        if self._device_mesh is not None:
            # Not sharded: the HVPs are double backward passes, and FSDP2 frees a layer's gathered
            # weights after its backward, which the second pass needs again. Each rank keeps the
            # whole frozen base (as under ddp) and the HVPs are summed by hand, so the step is
            # still exact; only the memory saving is lost.
            rank_zero_warn(
                "InfluenceStep under ModelParallelStrategy keeps a full copy of the model on every rank "
                "(its double-backward HVPs do not go through FSDP2's sharding); use bf16 to halve it"
            )
        base = load_model(self.model_spec)
        try:
            self.model = load_adapter(base, self.adapter_dir, trainable=True)
        except (OSError, ValueError) as err:
            raise UserError(f"could not load a peft adapter from '{self.adapter_dir}': {err}") from None

    def configure_optimizers(self) -> None:
        # Nothing to optimise: the step is a linear solve.
        return None

    # -- the step ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """Solve for this rank's shard (``InfluenceDataModule.shard``), apply v, stop fit."""
        kind = batch["kind"]
        if self.edit_kind is not None and kind != self.edit_kind:
            raise UserError(
                f"InfluenceStep is configured for edit '{self.edit_kind}' but the data holds '{kind}'"
            )
        if self.method in ("stochastic", "lissa") and self.trainer.world_size > 1:
            # Every rank must draw from the same number of mini-batches (the data module ensures it).
            counts = self.all_gather(torch.tensor(len(batch["train"]), device=self.device))
            if counts.min() != counts.max():
                raise InfluenceError(f"ranks hold different numbers of training batches: {counts.tolist()}")
        edit = Edit(kind, **batch["edit"])
        options = dict(self.options)
        progress = None
        if self.method not in ("exact", *LAYERWISE_METHODS):  # these report no iterations
            progress = options["on_step"] = _Progress(self, options.get("max_iter"))
        start = time.perf_counter()
        try:
            with torch.autocast(self.device.type, enabled=False):
                v, result = influence_delta(
                    self.model, batch["train"], edit, batch["n_train"], self.damping, self.method,
                    reduce=all_reduce_sum, **options,
                )  # fmt: skip
        finally:
            if progress is not None:
                progress.close()
        wall = time.perf_counter() - start
        apply_delta(self.model, v)
        v_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v.values()))
        self.summary = {
            "edit": kind,
            "method": self.method,
            "damping": self.damping,
            "options": dict(self.options),
            "n_train": int(batch["n_train"]),
            "n_edited": len(batch["edited_ids"]),
            "edited_ids": list(batch["edited_ids"]),
            "iterations": result.iterations,
            "relative_residual": result.relative_residual,
            "v_norm": v_norm,
            "wall_time_s": wall,
            "world_size": self.trainer.world_size,
            "adapter_dir": self.adapter_dir,
        }
        final = {"influence/v_norm": v_norm, "influence/iterations": float(result.iterations),
                 "influence/wall_time_s": wall}  # fmt: skip
        if result.relative_residual is not None:
            final["influence/final_relative_residual"] = result.relative_residual
        for logger in self.loggers:
            logger.log_metrics(final, step=max(result.iterations, 1))
        residual = "not computed" if result.relative_residual is None else f"{result.relative_residual:.2e}"
        rank_zero_info(
            f"influence step ({kind}, {self.method}): {result.iterations} iterations, relative residual "
            f"{residual}, |v| {v_norm:.3g}, {wall:.1f} s"
        )
        self.trainer.should_stop = True

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero or self.summary is None:
            return
        if self.out_dir is None:
            rank_zero_warn(
                "InfluenceStep: no out_dir set, so the edited adapter is only in memory (export it)"
            )
            return
        self.export(self.out_dir, merge=False)

    # -- export -------------------------------------------------------------------------------
    def export(self, directory: str | Path, merge: bool = True, tokenizer: str | None = None) -> Path:
        """Save the edited model, its tokenizer and ``summary.json`` in one atomic step: merged full
        weights, or the edited peft adapter alone (load it on the base with ``load_adapter``)."""
        if self.model is None or self.summary is None:
            raise UserError("InfluenceStep: nothing to export before fit has run the influence step")
        return super().export(directory, merge, tokenizer)

    def export_files(self) -> dict[str, str]:
        return {"summary.json": json.dumps(self.summary, indent=2) + "\n"}
