"""The base LightningModule every unlearning objective derives from.

``training_step`` = forget_weight * forget_loss(batch) + retain_weight * retain_loss(batch); a
subclass overrides ``forget_loss`` and, when its retain term is not the default NLL,
``retain_loss``. Model loading, checkpoints of the trainable tensors and export are
``AdaptedModel``'s (objectives/adapted.py); the reference is a small object chosen by name
(objectives/reference.py: ``adapter_off``, ``cached``, ``copy``); a non-finite training loss is
caught by ``NonFiniteGuard`` (callbacks/nonfinite.py), which ``stop_on_nonfinite`` installs.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from transformers import SchedulerType, get_scheduler

from lightning_unlearn.callbacks.nonfinite import NonFiniteGuard
from lightning_unlearn.errors import UserError
from lightning_unlearn.logits import (
    DenseLogits,
    HeadLogits,
    Logits,
    decoder_and_head,
    model_logits,
    shared_hidden,
    softcap,
)
from lightning_unlearn.losses import kl_divergence, label_mask, nll_loss
from lightning_unlearn.models import (
    LoraSpec,
    ModelSpec,
    attach_lora,
    enable_activation_checkpointing,
    load_model,
)
from lightning_unlearn.objectives.adapted import AdaptedModel
from lightning_unlearn.objectives.reference import REFERENCES, Reference
from lightning_unlearn.sharding import fully_shard_model

REFERENCE_POLICIES = tuple(REFERENCES)


def adamw(params) -> torch.optim.Optimizer:
    """Default optimiser: AdamW at closer-look's unlearning learning rate."""
    return torch.optim.AdamW(params, lr=1e-5)


class UnlearningObjective(AdaptedModel):
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
        lr_schedule: a transformers scheduler name (``constant``, ``constant_with_warmup``,
            ``linear``, ``cosine``...). ``constant`` has no warm-up, so a warm-up asks for another.
        warmup_ratio: fraction of the total steps spent warming up.
        warmup_steps: steps spent warming up, instead of ``warmup_ratio``. A count does not depend
            on the run's length, so a recipe stopped early (``trainer.max_steps``) at constant
            learning rate after warm-up trains exactly the first steps of the longer run.
        activation_checkpointing: keep only each decoder layer's input from the forward pass and
            recompute the rest during backward (transformers' non-reentrant checkpointing): the
            activations of a long sequence stop scaling with depth, for about one extra forward.
        stop_on_nonfinite: stop fit at a nan/inf training loss, before its backward, and export
            the last good weights to ``<log_dir>/last_good`` (``NonFiniteGuard``, which this
            installs on every trainer that fits the objective). Keeps a copy of the trainable
            parameters on their device: small for a LoRA, a second copy of the model for full
            fine-tuning (turn it off if that does not fit).
    """

    # Whether the loss reads the reference (its policy object is set up in configure_model only
    # then); an objective whose terms decide it sets it in __init__.
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
        warmup_steps: int = 0,
        activation_checkpointing: bool = False,
        stop_on_nonfinite: bool = True,
    ) -> None:
        super().__init__(model, adapter)
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
        if warmup_steps < 0:
            raise UserError(f"warmup_steps must not be negative, got {warmup_steps}")
        if warmup_ratio and warmup_steps:
            raise UserError("set warmup_ratio or warmup_steps, not both")
        if (warmup_ratio or warmup_steps) and lr_schedule == "constant":
            # transformers' constant schedule ignores num_warmup_steps: the warm-up would be lost.
            raise UserError("lr_schedule 'constant' has no warm-up; use 'constant_with_warmup'")
        self.forget_weight, self.retain_weight = forget_weight, retain_weight
        default = "cached" if self.cacheable else "adapter_off" if adapter is not None else "copy"
        self.reference_policy = reference or default
        self.optimizer_factory, self.lr_schedule = optimizer, lr_schedule
        self.warmup_ratio, self.warmup_steps = warmup_ratio, warmup_steps
        self.activation_checkpointing = activation_checkpointing
        self.stop_on_nonfinite = stop_on_nonfinite
        self._reference: Reference = REFERENCES[self.reference_policy]()
        self._guard = NonFiniteGuard()  # installed by configure_callbacks while stop_on_nonfinite
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
        if self.uses_reference:
            self._reference.setup(model)  # before the adapter: a copy is of the target alone
        if self.adapter_spec is not None:
            model = attach_lora(model, self.adapter_spec)
        # from_pretrained returns a model in eval mode, and Lightning keeps each submodule's mode:
        # without this a LoRA's dropout (or the model's own) would never run in training.
        self.model = model.train()
        mesh = self._device_mesh  # set by ModelParallelStrategy: shard with FSDP2
        if mesh is not None:
            fully_shard_model(self.model, mesh)
            self._reference.shard(mesh)

    def logits(self, sub_batch: dict[str, Tensor]) -> Logits:
        """The model's logits on ``sub_batch``, computed only where a loss reads them (a step's
        shared forward is reused when it covered this sub-batch)."""
        hidden = self._step_hidden.get(id(sub_batch))
        if hidden is not None:
            return HeadLogits(
                hidden, decoder_and_head(self.model)[1], softcap(self.model), self.logit_chunk_rows
            )
        return self.logits_of(self.model, sub_batch)

    def logits_of(self, model: torch.nn.Module, sub_batch: dict[str, Tensor]) -> Logits:
        """``model``'s logits on ``sub_batch`` the way this objective reads them (scored rows, or
        dense with ``scored_logits = False``): the model's own and the reference's alike."""
        if not self.scored_logits:
            return DenseLogits(
                model(input_ids=sub_batch["input_ids"], attention_mask=sub_batch["attention_mask"]).logits
            )
        return model_logits(model, sub_batch, self.logit_chunk_rows)

    @torch.no_grad()
    def reference_logits(self, sub_batch: dict[str, Tensor]) -> Logits:
        """Logits of the model being unlearned as it was before unlearning started."""
        return self._reference.logits(self, sub_batch)

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

    @torch.no_grad()
    def reference_logprob(self, name: str, sub_batch: dict[str, Tensor]) -> Tensor:
        """Sequence log-probs ``[B]`` of sub-batch ``name`` under the reference, from the cache
        (by row index) when the policy is ``cached``."""
        return self._reference.logprob(self, name, sub_batch)

    @property
    def reference_model(self) -> torch.nn.Module | None:
        """The frozen copy of the ``copy`` reference (None under the other policies)."""
        return getattr(self._reference, "model", None)

    @property
    def reference_cache(self) -> dict[str, Tensor]:
        """The ``cached`` reference's table (sub-batch name -> log-prob by row index); {} otherwise."""
        return getattr(self._reference, "cache", {})

    @reference_cache.setter
    def reference_cache(self, cache: dict[str, Tensor]) -> None:
        self._reference.load_state(cache)

    def build_reference_cache(self, datamodule) -> None:
        """(Re)compute the ``cached`` reference over ``datamodule`` (see ``CachedReference.build``)."""
        if self.reference_policy != "cached":
            raise RuntimeError(f"{type(self).__name__}: reference '{self.reference_policy}' has no cache")
        self._reference.build(self, datamodule)

    def on_fit_start(self) -> None:
        self._reference.prepare(self)

    def on_validation_start(self) -> None:
        self._reference.prepare(self)

    def on_test_start(self) -> None:
        self._reference.prepare(self)

    def configure_callbacks(self) -> list:
        """The non-finite guard, while ``stop_on_nonfinite``: every trainer gets it, no config entry."""
        return [self._guard] if self.stop_on_nonfinite else []

    def forget_last_good(self) -> None:
        """The trainable weights were replaced (a new deletion request's adapter): the guard's
        snapshot is no fallback for them, so a non-finite first step writes nothing."""
        self._guard.forget()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run must not recompute the cache from weights that have already moved.
        checkpoint["reference_cache"] = self._reference.state()
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._reference.load_state(dict(checkpoint.get("reference_cache", {})))
        super().on_load_checkpoint(checkpoint)

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

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for _, p in self.trainable()]
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
            num_warmup_steps=self.warmup_steps or int(self.warmup_ratio * total),
            num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
