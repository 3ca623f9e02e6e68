"""The base LightningModule every unlearning objective derives from.

``training_step`` = forget_weight * forget_loss(batch) + retain_weight * retain_loss(batch); a
subclass overrides ``forget_loss`` and, when its retain term is not the default NLL,
``retain_loss``. The model is loaded in ``configure_model`` so sharding strategies can wrap it.

The reference is the fine-tuned target itself, before unlearning: the same weights with the LoRA
adapter disabled (``adapter_off``, no extra memory, one extra forward per use), a frozen copy
(``copy``, full fine-tuning), or, for objectives that use it only through sequence log-probs of
fixed sub-batches (NPO, IdkDPO), those log-probs computed once at the start of fit, each rank
computing a shard, and looked up by row index afterwards (``cached``: no extra memory and no
extra forward per step).

A non-finite training loss stops the run before the update that would absorb it, with the last
good weights exported (``stop_on_nonfinite``; see ``on_before_backward``).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from transformers import SchedulerType, get_scheduler

from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.io import atomic_directory
from lightning_unlearn.logits import (
    DenseLogits,
    HeadLogits,
    Logits,
    decoder_and_head,
    model_logits,
    shared_hidden,
    softcap,
)
from lightning_unlearn.losses import kl_divergence, label_mask, nll_loss, sequence_logprob
from lightning_unlearn.models import (
    LoraSpec,
    ModelSpec,
    attach_lora,
    enable_activation_checkpointing,
    load_model,
    load_spec_tokenizer,
)
from lightning_unlearn.sharding import full_state_dict, fully_shard_model, is_sharded, local_shard

REFERENCE_POLICIES = ("adapter_off", "cached", "copy")
# A loss's kind of non-finiteness, ordered so a max over ranks reports the worst: nan beats inf.
NONFINITE_KINDS = ("finite", "-inf", "inf", "nan")


def adamw(params) -> torch.optim.Optimizer:
    """Default optimiser: AdamW at closer-look's unlearning learning rate."""
    return torch.optim.AdamW(params, lr=1e-5)


class NonFiniteLoss(UserError):
    """The training loss became nan or inf; ``directory`` holds the last good weights (None when
    the first step of the fit already failed, so nothing was trained and nothing written)."""

    def __init__(self, message: str, step: int, last_good_step: int | None, directory: Path | None) -> None:
        super().__init__(message)
        self.step, self.last_good_step, self.directory = step, last_good_step, directory


class UnlearningObjective(LightningModule):
    """Loss = forget_weight * forget_loss + retain_weight * retain_loss, on ``{"forget", "retain"}`` batches.

    Args:
        model: where the model being unlearned comes from (the fine-tuned target); may be set
            after construction (the protocol does), but must be set before ``configure_model``.
        adapter: LoRA settings; None trains every weight.
        forget_weight: gamma, the weight of the forget term.
        retain_weight: alpha, the weight of the retain term (0 skips its forward pass).
        reference: ``adapter_off``, ``cached`` or ``copy``; None picks the cheapest exact one
            (``cached`` where the objective allows it, else ``adapter_off`` with an adapter, else
            ``copy``). Only built if the objective uses a reference.
        optimizer: optimiser factory (LightningCLI ``class_path``/``init_args``).
        lr_schedule: a transformers scheduler name (``constant``, ``linear``, ``cosine``...).
        warmup_ratio: fraction of the total steps spent warming up.
        activation_checkpointing: keep only each decoder layer's input from the forward pass and
            recompute the rest during backward (transformers' non-reentrant checkpointing): the
            activations of a long sequence stop scaling with depth, for about one extra forward.
        stop_on_nonfinite: stop fit at a nan/inf training loss, before its backward, and export
            the last good weights to ``<log_dir>/last_good`` (see ``on_before_backward``). Keeps a
            copy of the trainable parameters on their device: small for a LoRA, a second copy of
            the model for full fine-tuning (turn it off if that does not fit).
    """

    uses_reference = False
    # Whether batches need refusal sub-batches (forget_idk, retain_idk): the protocol adds them.
    needs_refusals = False
    # Sub-batches whose reference enters the loss only as sequence log-probs: these can be cached.
    cacheable: tuple[str, ...] = ()
    # The sub-batches forget_loss and retain_loss read through ``logits``: a training step runs
    # the decoder once over all of those it uses (``shared_hidden``).
    forget_inputs: tuple[str, ...] = ("forget",)
    retain_inputs: tuple[str, ...] = ("retain",)
    # Losses read logits only at the positions they score, through the output layer in chunks of
    # this many rows (None: sized to a fixed number of logits; see ``lightning_unlearn.logits``).
    # ``scored_logits = False`` computes full logits instead (the reference path tests compare to).
    scored_logits = True
    logit_chunk_rows: int | None = None

    def __init__(
        self,
        model: ModelSpec | None = None,
        adapter: LoraSpec | None = None,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        reference: str | None = None,
        optimizer: OptimizerCallable = adamw,
        lr_schedule: str = "constant",
        warmup_ratio: float = 0.0,
        activation_checkpointing: bool = False,
        stop_on_nonfinite: bool = True,
    ) -> None:
        super().__init__()
        if reference is not None and reference not in REFERENCE_POLICIES:
            raise UserError(f"reference must be one of {', '.join(REFERENCE_POLICIES)}, got {reference!r}")
        if reference == "adapter_off" and adapter is None:
            raise UserError(
                "reference 'adapter_off' needs an adapter (LoRA); use 'copy' for full fine-tuning"
            )
        if reference == "cached" and not self.cacheable:
            raise UserError(
                f"reference 'cached' only applies to objectives that use the reference's sequence "
                f"log-probs (NPO, IdkDPO); {type(self).__name__} needs its logits: use 'adapter_off' or 'copy'"
            )
        if forget_weight < 0 or retain_weight < 0:
            raise UserError("forget_weight and retain_weight must be non-negative")
        schedules = [t.value for t in SchedulerType]
        if lr_schedule not in schedules:
            raise UserError(f"lr_schedule must be one of {', '.join(schedules)}, got {lr_schedule!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise UserError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.model_spec, self.adapter_spec = model, adapter
        self.forget_weight, self.retain_weight = forget_weight, retain_weight
        default = "cached" if self.cacheable else "adapter_off" if adapter is not None else "copy"
        self.reference_policy = reference or default
        self.optimizer_factory, self.lr_schedule, self.warmup_ratio = optimizer, lr_schedule, warmup_ratio
        self.activation_checkpointing = activation_checkpointing
        self.stop_on_nonfinite = stop_on_nonfinite
        # The trainable parameters (this rank's shards) at the last step whose losses were all
        # finite, and that step; a plain dict, so never part of state_dict or a checkpoint.
        self._last_good: dict[str, Tensor] = {}
        self._last_good_step: int | None = None
        self.model: torch.nn.Module | None = None
        self.reference_model: torch.nn.Module | None = None
        self.reference_cache: dict[str, Tensor] = {}
        # This step's decoder outputs by sub-batch (id -> hidden states), from one shared forward.
        self._step_hidden: dict[int, Tensor] = {}

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.model_spec is None:
            raise UserError(f"{type(self).__name__}: no model given (set model.path or model.config)")
        model = load_model(self.model_spec)
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.uses_reference and self.reference_policy == "copy":
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        if self.adapter_spec is not None:
            model = attach_lora(model, self.adapter_spec)
        self.model = model
        mesh = self._device_mesh  # set by ModelParallelStrategy: shard with FSDP2
        if mesh is not None:
            fully_shard_model(self.model, mesh)
            if self.reference_model is not None:
                fully_shard_model(self.reference_model, mesh)

    def forward(self, sub_batch: dict[str, Tensor]) -> Tensor:
        """Full ``[B, T, V]`` logits. Losses read ``logits`` instead, which never builds them."""
        return self.model(input_ids=sub_batch["input_ids"], attention_mask=sub_batch["attention_mask"]).logits

    def logits(self, sub_batch: dict[str, Tensor]) -> Logits:
        """The model's logits on ``sub_batch``, computed only where a loss reads them (a step's
        shared forward is reused when it covered this sub-batch)."""
        hidden = self._step_hidden.get(id(sub_batch))
        if hidden is not None:
            return HeadLogits(
                hidden, decoder_and_head(self.model)[1], softcap(self.model), self.logit_chunk_rows
            )
        return self._model_logits(self.model, sub_batch)

    def _model_logits(self, model: torch.nn.Module, sub_batch: dict[str, Tensor]) -> Logits:
        if not self.scored_logits:
            return DenseLogits(
                model(input_ids=sub_batch["input_ids"], attention_mask=sub_batch["attention_mask"]).logits
            )
        return model_logits(model, sub_batch, self.logit_chunk_rows)

    @torch.no_grad()
    def reference_logits(self, sub_batch: dict[str, Tensor]) -> Logits:
        """Logits of the model being unlearned as it was before unlearning started."""
        if self.reference_model is not None:
            return self._model_logits(self.reference_model, sub_batch)
        if self.adapter_spec is None:
            raise RuntimeError(
                f"{type(self).__name__}: the '{self.reference_policy}' reference has no logits"
            )
        with self.model.disable_adapter():
            head = decoder_and_head(self.model)[1]
            if head is not None and any("lora_" in name for name, _ in head.named_parameters()):
                return DenseLogits(self(sub_batch))  # an adapted head must run with its adapter off
            return self._model_logits(self.model, sub_batch)

    def share_forward(self, batch: dict, stage: str) -> None:
        """Run the decoder once over every sub-batch this step's terms read (see ``shared_hidden``)."""
        use_forget, use_retain = self.active_terms(stage)
        names = (self.forget_inputs if use_forget else ()) + (
            self.retain_inputs if use_retain and self.retain_weight > 0 else ()
        )
        subs = [batch[name] for name in dict.fromkeys(names) if isinstance(batch.get(name), dict)]
        if len(subs) < 2 or not self.scored_logits:
            return
        hidden = shared_hidden(self.model, subs)
        if hidden is not None:
            self._step_hidden = {id(sub): h for sub, h in zip(subs, hidden, strict=True)}

    def reference_logprob(self, name: str, sub_batch: dict[str, Tensor]) -> Tensor:
        """Sequence log-probs ``[B]`` of sub-batch ``name`` under the reference, from the cache
        (by row index) when the policy is ``cached``."""
        if self.reference_policy != "cached":
            return sequence_logprob(self.reference_logits(sub_batch), sub_batch["labels"])
        if name not in self.reference_cache:
            raise RuntimeError(f"no cached reference for '{name}': call build_reference_cache first")
        return self.reference_cache[name].to(sub_batch["index"].device)[sub_batch["index"]]

    # -- the cached reference ------------------------------------------------------------------
    @torch.no_grad()
    def build_reference_cache(self, datamodule) -> None:
        """Each rank scores its contiguous shard of every cacheable sub-batch with the frozen
        model; a sum over ranks of (values, counts) gives every rank the whole table."""
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        was_training = self.model.training
        self.model.eval()
        try:
            for name in self.cacheable:
                size = len(getattr(datamodule.dataset, name) or [])
                values = torch.zeros(size, dtype=torch.float64, device=self.device)
                counts = torch.zeros(size, dtype=torch.float64, device=self.device)
                for sub in datamodule.reference_loader(name, rank, world):
                    sub = {k: v.to(self.device) for k, v in sub.items()}
                    # The training step's autocast, so a cached value equals what a step would compute.
                    precision = trainer.precision_plugin.forward_context() if trainer else nullcontext()
                    # Fit has not updated the weights yet, so without an adapter they are the target.
                    adapter_off = self.model.disable_adapter() if self.adapter_spec else nullcontext()
                    with precision, adapter_off:
                        logp = sequence_logprob(self.logits(sub), sub["labels"]).double()
                    values.index_add_(0, sub["index"], logp)
                    counts.index_add_(0, sub["index"], torch.ones_like(logp))
                if trainer is not None and world > 1:
                    values = trainer.strategy.reduce(values, reduce_op="sum")
                    counts = trainer.strategy.reduce(counts, reduce_op="sum")
                self.reference_cache[name] = (values / counts).float()
        finally:
            self.model.train(was_training)

    def _ensure_reference_cache(self) -> None:
        if self.reference_policy != "cached" or self.reference_cache:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "reference_loader"):
            raise UserError(
                "reference 'cached' needs an UnlearningDataModule (it precomputes over the forget data)"
            )
        self.build_reference_cache(datamodule)

    def on_fit_start(self) -> None:
        # A snapshot from an earlier fit of this object is not a good state of this one.
        self._last_good_step = None
        self._ensure_reference_cache()

    def on_fit_end(self) -> None:
        self._last_good, self._last_good_step = {}, None  # free the copy (a whole model when full FT)

    def forget_last_good(self) -> None:
        """The trainable weights were replaced (a new deletion request's adapter): the snapshot
        is no fallback for them, so a non-finite first step writes nothing."""
        self._last_good_step = None

    def on_validation_start(self) -> None:
        self._ensure_reference_cache()

    def on_test_start(self) -> None:
        self._ensure_reference_cache()

    @property
    def strict_loading(self) -> bool:
        # A checkpoint holds the trainable tensors only (on_save_checkpoint); on_load_checkpoint
        # checks that every one of them is there.
        return False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run must not recompute the cache from weights that have already moved.
        checkpoint["reference_cache"] = {k: v.cpu() for k, v in self.reference_cache.items()}
        # Frozen tensors (a LoRA's base, a copied reference, InfluenceStep's base) are the
        # model_spec's, rebuilt by configure_model: keep only what training changes, so an
        # epoch's checkpoint of a LoRA run is megabytes, not the whole model.
        trainable = {name for name, _ in self._trainable()}
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.reference_cache = dict(checkpoint.get("reference_cache", {}))
        if "state_dict" not in checkpoint:  # a distributed checkpoint: the strategy loaded the shards
            return
        trainable = {name for name, _ in self._trainable()}
        missing = sorted(trainable - set(checkpoint.get("state_dict", {})))
        if missing:
            raise UserError(
                f"the checkpoint does not hold this objective's trainable weights ({len(missing)} missing, "
                f"e.g. '{missing[0]}'): it was written by another model or adapter configuration"
            )

    def reference_kl(self, sub_batch: dict[str, Tensor], logits: Logits | None = None) -> Tensor:
        """KL(reference || model) per scored position, averaged over the label tokens of the global
        batch (see ``token_count``); ``logits`` are the model's, when the caller already has them."""
        logits = self.logits(sub_batch) if logits is None else logits
        mask = label_mask(sub_batch["labels"])
        positions = torch.nn.functional.pad(mask, (0, 1), value=False)
        return kl_divergence(
            logits, self.reference_logits(sub_batch), positions, num_tokens=self.token_count(mask)
        )

    def sub_batch(self, batch: dict, name: str) -> dict[str, Tensor]:
        """``batch[name]``, or a clear error saying how to get it."""
        if name not in batch:
            how = "set the data module's refusals (builtin or a file)" if name.endswith("_idk") else ""
            raise UserError(f"{type(self).__name__} needs '{name}' sub-batches; {how}".rstrip("; "))
        return batch[name]

    def token_count(self, mask: Tensor) -> Tensor | None:
        """The ``num_tokens`` of a token-mean loss over ``mask``: None in one process (the loss's
        own count), else the mean count per rank. A per-rank token mean would make DDP's gradient
        average depend on how answer lengths fall across ranks; dividing each rank's sum by the
        mean count per rank makes 2 processes train exactly like 1. A collective: every rank must
        call it, in the same order."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return None
        return trainer.strategy.reduce(mask.sum().float(), reduce_op="mean").clamp_min(1)

    def nll(self, logits: Tensor | Logits, labels: Tensor) -> Tensor:
        """NLL averaged over the label tokens of the global batch (see ``token_count``)."""
        return nll_loss(logits, labels, num_tokens=self.token_count(label_mask(labels)))

    # -- losses: the two methods a subclass overrides ---------------------------------------
    def forget_loss(self, batch: dict) -> Tensor:
        raise NotImplementedError

    def retain_loss(self, batch: dict) -> Tensor:
        """NLL on the retain answers: the retain term of most objectives."""
        return self.nll(self.logits(batch["retain"]), batch["retain"]["labels"])

    def log_term(self, stage: str, name: str, value: Tensor) -> None:
        """Log ``stage/name``: on the progress bar while training; averaged over ranks for val/test,
        whose epoch values must be global means under DDP."""
        self.log(f"{stage}/{name}", value, prog_bar=stage == "train", sync_dist=stage != "train")

    def active_terms(self, stage: str) -> tuple[bool, bool]:
        """Which of (forget, retain) this step trains; both, except for alternating schedules."""
        return True, True

    def step(self, batch: dict, stage: str) -> Tensor:
        """The objective on one batch, each term logged under ``stage/`` (train, val or test)."""
        self.share_forward(batch, stage)
        try:
            return self._compose(batch, stage)
        finally:
            self._step_hidden = {}

    def _compose(self, batch: dict, stage: str) -> Tensor:
        use_forget, use_retain = self.active_terms(stage)
        loss = torch.zeros((), device=self.device)
        if use_forget:
            forget = self.forget_loss(batch)
            loss = loss + self.forget_weight * forget
            self.log_term(stage, "forget_loss", forget)
        if use_retain and self.retain_weight > 0 and "retain" in batch:
            retain = self.retain_loss(batch)
            loss = loss + self.retain_weight * retain
            self.log_term(stage, "retain_loss", retain)
        self.log_term(stage, "loss", loss)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "val")
        self._log_nll(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "test")
        self._log_nll(batch, "test")

    def _log_nll(self, batch: dict, stage: str) -> None:
        # Plain NLL of each sub-batch: comparable across objectives, unlike their losses.
        for name, sub in batch.items():
            if isinstance(sub, dict):
                self.log_term(stage, f"{name}_nll", self.nll(self.logits(sub), sub["labels"]))

    def on_train_epoch_start(self) -> None:
        # New retain partners each epoch, identical on every rank (see UnlearningDataModule).
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    # -- non-finite losses ----------------------------------------------------------------------
    def _trainable(self) -> list[tuple[str, Tensor]]:
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Snapshot the weights w_t of step t: every loss of this step was finite (else
        ``on_before_backward`` had stopped the run) and the optimizer has not moved them yet."""
        if not self.stop_on_nonfinite:
            return
        with torch.no_grad():
            for name, param in self._trainable():
                local, kept = local_shard(param), self._last_good.get(name)
                if kept is not None and kept.shape == local.shape and kept.dtype == local.dtype:
                    kept.copy_(local)
                else:
                    self._last_good[name] = local.detach().clone()
        self._last_good_step = self.trainer.global_step

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop at a nan/inf loss before its gradient reaches the weights.

        Every rank learns whether any rank's loss is non-finite (a max all-reduce, so all stop
        together instead of some waiting in the next collective). The weights that produced the
        bad loss, w_k, came out of the update of step k-1, which is what diverged (a finite loss
        can still give inf gradients), so they are not kept. The last good weights are w_j, the
        weights at which the last fully finite step j (j = k-1 without a resume in between) was
        evaluated: they are written back into the model, exported with ``export(merge=False)``
        (a peft adapter, or the whole model without one) to ``<log_dir>/last_good`` (the logger's
        run directory, ``default_root_dir`` without a logger), and ``NonFiniteLoss`` (a
        ``UserError``) names both steps and the directory. Nothing else is written: Lightning
        skips ``on_fit_end`` (so ``ExportModel``) when fit raises.
        """
        if not self.stop_on_nonfinite:
            return
        value = loss.detach().float()
        code = torch.where(value.isnan(), 3, torch.where(value.isposinf(), 2, value.isneginf().long()))
        code = code.max().float()
        if self.trainer.world_size > 1:
            code = self.trainer.strategy.reduce(code, reduce_op="max")
        worst = int(code.item())  # one scalar sync per backward: negligible beside the step
        if worst == 0:
            return
        kind, step, epoch = NONFINITE_KINDS[worst], self.trainer.global_step, self.current_epoch
        what = "adapter" if self.adapter_spec is not None else "model"
        if self._last_good_step is None:
            raise NonFiniteLoss(
                f"non-finite training loss ({kind}) at epoch {epoch}, step {step}, the first step of "
                f"this fit: stopped, nothing written (the starting weights already give it: check the "
                f"model, the data and the precision)",
                step,
                None,
                None,
            )
        self._restore_last_good()
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "last_good"
        self.export(directory, merge=False)
        self.trainer.strategy.barrier("nonfinite_export")  # no rank exits before rank 0 has written
        good = self._last_good_step
        raise NonFiniteLoss(
            f"non-finite training loss ({kind}) at epoch {epoch}, step {step}: stopped before the "
            f"update; the last good {what} (the weights at step {good}, whose loss was finite) is in "
            f"{directory}",
            step,
            good,
            directory,
        )

    def _restore_last_good(self) -> None:
        """Write the snapshot back into the live parameters. FSDP2 leaves a unit gathered between
        forward and backward unless it reshards after forward (``fully_shard_model`` asks for
        that; torch's own default keeps the root gathered): reshard first, so every parameter is
        its sharded DTensor again and the snapshot's shards land in the storage FSDP2 owns."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        with torch.no_grad():
            for name, param in self._trainable():
                local = local_shard(param)
                if name not in self._last_good or self._last_good[name].shape != local.shape:
                    raise RuntimeError(f"last good snapshot does not fit parameter {name}")
                local.copy_(self._last_good[name])

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        try:
            optimizer = self.optimizer_factory(params)
        except ValueError as err:  # torch validates its arguments with ValueError
            if "learning rate" in str(err).lower():
                raise UserError(f"optimizer.init_args.lr must not be negative ({err})") from None
            raise UserError(f"optimizer: {err}") from None
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            self.lr_schedule,
            optimizer,
            num_warmup_steps=int(self.warmup_ratio * total),
            num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- export -------------------------------------------------------------------------------
    def gathered_state(self) -> dict[str, Tensor]:
        """The trained tensors of the FSDP2-sharded model as full CPU tensors (a collective: every
        rank calls it). With an adapter only the LoRA tensors travel; the base is the spec's own."""
        keep = (lambda name: "lora_" in name) if self.adapter_spec is not None else None
        return full_state_dict(self.model, keep)

    def model_from_state(self, state: dict[str, Tensor]) -> torch.nn.Module:
        """A plain (unsharded) model: ``model_spec``'s, with its adapter, holding ``state``."""
        model = load_model(self.model_spec)
        if self.adapter_spec is not None:
            model = attach_lora(model, self.adapter_spec)
        missing, unexpected = model.load_state_dict(state, strict=self.adapter_spec is None)
        if unexpected or any("lora_" in name for name in missing):
            raise RuntimeError(f"gathered state does not fit the model: {unexpected or missing}")
        return model

    def export(self, directory: str | Path, merge: bool = True, tokenizer: str | None = None) -> Path:
        """Save the unlearned model and its tokenizer in one atomic step: merged full weights, or the
        peft adapter alone. ``tokenizer`` defaults to the model's own. Every rank must call it
        (a sharded model is gathered first); only global rank 0 writes."""
        state = self.gathered_state() if is_sharded(self.model) else None
        if self._trainer is not None and not self.trainer.is_global_zero:
            return Path(directory)
        model = self.model if state is None else self.model_from_state(state)
        if merge and hasattr(model, "merge_and_unload"):  # a peft model: fold the adapter in
            model = copy.deepcopy(model).merge_and_unload()
        tok = load_tokenizer(tokenizer) if tokenizer else load_spec_tokenizer(self.model_spec)
        with atomic_directory(directory) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for name, text in self.export_files().items():
                (tmp / name).write_text(text)
        return Path(directory)

    def export_files(self) -> dict[str, str]:
        """Extra text files ``export`` writes beside the model (name -> content); none here."""
        return {}
