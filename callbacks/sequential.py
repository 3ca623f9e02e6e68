"""SequentialForgetting: a schedule of deletion requests inside one ``Trainer.fit`` (DESIGN section 7).

Each request trains the objective's LoRA adapter for ``epochs_per_request`` epochs on that
request's forget records, then records the Gram matrix of the inputs of every adapted linear layer
over those records, saves the adapter and its Grams, appends to the ledger and fuses every request
so far. ``independent`` (EUL) re-initialises the one adapter slot for every request, so each adapter
is trained on the frozen base and the fused adapter combines them in closed form; ``stacked``
(continual unlearning) keeps training the same slot, so request k starts where k-1 ended and the
fused adapter is simply the latest one. The set of trainable parameters never changes, which is
what DDP and FSDP need once they have wrapped the model.

Files under ``dirpath``: ``requests/<k>/`` (peft adapter, ``grams.safetensors`` keyed by module
name, ``request.json``), ``fused/`` (peft adapter, ``fusion.json``), ``ledger.jsonl`` (one line
per request). Every write is atomic. Rerunning the same command after a crash skips the requests
the ledger marks done (their records must hash the same) and continues with the next.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from safetensors.torch import load_file, save_file

from lightning_unlearn.adapters import load_factors, regmean, save_factors, svd_truncate
from lightning_unlearn.data.records import load_records
from lightning_unlearn.errors import UserError
from lightning_unlearn.io import atomic_directory, write_text_atomic

MODES = ("independent", "stacked")


@dataclass
class ForgetRequest:
    """One deletion request: record ids of the data module's forget split, or a file of records."""

    name: str
    ids: list[str] | None = None
    file: str | None = None


def records_hash(records: list[dict]) -> str:
    """sha256 of the records' canonical JSON: the ledger's proof of what was forgotten."""
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


class SequentialForgetting(Callback):
    """Args:
    dirpath: the run directory (requests/, fused/, ledger.jsonl).
    requests: the schedule, in order.
    mode: ``independent`` (train each request on the frozen base, fuse) or ``stacked``.
    epochs_per_request: epochs of the objective per request (the Trainer's max_epochs is set to
        the number of pending requests times this).
    ridge: RegMean's ridge, relative to each layer's mean Gram diagonal.
    fused_rank: truncate the fused adapter to this rank by SVD (error in fusion.json).
    seed: each request's adapter initialisation and data order are seeded by (seed, request).
    """

    def __init__(
        self,
        dirpath: str,
        requests: list[ForgetRequest],
        mode: str = "independent",
        epochs_per_request: int = 1,
        ridge: float = 1e-4,
        fused_rank: int | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not requests:
            raise UserError("SequentialForgetting needs at least one request")
        names = [r.name for r in requests]
        if len(set(names)) != len(names):
            raise UserError(f"request names must be unique, got {names}")
        if epochs_per_request < 1:
            raise UserError(f"epochs_per_request must be at least 1, got {epochs_per_request}")
        self.dirpath, self.requests, self.mode = Path(dirpath), list(requests), mode
        self.epochs_per_request, self.ridge, self.fused_rank, self.seed = (
            epochs_per_request,
            ridge,
            fused_rank,
            seed,
        )
        self.ledger: list[dict] = []
        self.pending: list[int] = []

    # -- schedule and resume -------------------------------------------------------------------
    def _records(self, datamodule, request: ForgetRequest) -> list[dict]:
        if (request.ids is None) == (request.file is None):
            raise UserError(f"request '{request.name}': give exactly one of ids or file")
        if request.file is not None:
            return load_records(request.file)
        return datamodule.records_by_id(request.ids)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, "adapter_spec", None) is None:
            raise UserError(
                "SequentialForgetting trains one LoRA adapter per request: give the objective an adapter"
            )
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "set_forget"):
            raise UserError("SequentialForgetting needs an UnlearningDataModule")
        datamodule.setup("fit")
        self.records = [self._records(datamodule, r) for r in self.requests]
        ledger_path = self.dirpath / "ledger.jsonl"
        done = []
        if ledger_path.is_file():
            done = [json.loads(line) for line in ledger_path.read_text().splitlines() if line.strip()]
            done = [entry for entry in done if entry["status"] == "done"]
        for k, entry in enumerate(done):
            if k >= len(self.requests) or entry["sha256"] != records_hash(self.records[k]):
                raise UserError(
                    f"{ledger_path}: request {k} ('{entry['name']}') no longer matches the schedule; "
                    "use a new dirpath for a different schedule"
                )
        self.ledger, self.writer = done, trainer.is_global_zero
        self.pending = list(range(len(done), len(self.requests)))
        trainer.fit_loop.max_epochs = len(self.pending) * self.epochs_per_request
        trainer.reload_dataloaders_every_n_epochs = 1  # each request brings its own forget set
        if self.pending:  # the data first: the optimiser set-up sizes itself from it
            trainer.datamodule.set_forget(self.records[self.pending[0]])

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The model exists now (configure_model ran); the objective's own on_fit_start comes next.
        if self.pending:
            if self.mode == "stacked" and self.ledger:
                self._load_slot(pl_module, self.dirpath / "requests" / str(len(self.ledger) - 1))
            self._start(trainer, pl_module, self.pending[0], first_epoch=0)

    def _start(self, trainer: Trainer, pl_module: LightningModule, k: int, first_epoch: int) -> None:
        """Point the data at request k, seed it, and (independent) re-initialise the adapter slot."""
        datamodule = trainer.datamodule
        datamodule.set_forget(self.records[k])
        datamodule.epoch_offset = first_epoch
        torch.manual_seed(self.seed * 1_000_003 + k)
        if self.mode == "independent":
            with torch.no_grad():
                for module in pl_module.model.modules():
                    if hasattr(module, "reset_lora_parameters") and hasattr(module, "lora_A"):
                        for name in module.lora_A:
                            module.reset_lora_parameters(name, True)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        if getattr(pl_module, "reference_policy", None) == "cached" and pl_module.reference_cache:
            pl_module.reference_cache = {}
            pl_module.build_reference_cache(datamodule)
        self.current, self.started = k, time.time()
        self._write_ledger(extra={"index": k, "name": self.requests[k].name, "status": "running"})

    # -- per request -----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.epochs_per_request:
            return
        k = self.current
        grams = self._grams(trainer, pl_module)
        metrics = {n: float(v) for n, v in trainer.callback_metrics.items() if n.startswith("train/")}
        request_dir = self.dirpath / "requests" / str(k)
        if trainer.is_global_zero:
            with atomic_directory(request_dir) as tmp:
                pl_module.model.save_pretrained(tmp)
                save_file({n: g.contiguous() for n, g in grams.items()}, str(tmp / "grams.safetensors"))
                request = {**asdict(self.requests[k]), "index": k, "sha256": records_hash(self.records[k])}
                write_text_atomic(tmp / "request.json", json.dumps(request, indent=1) + "\n")
            self._fuse(pl_module, upto=k)
        entry = {
            "index": k,
            "name": self.requests[k].name,
            "ids": [str(r.get("id")) for r in self.records[k]],
            "sha256": records_hash(self.records[k]),
            "start": self.started,
            "end": time.time(),
            "status": "done",
            "metrics": metrics,
        }
        self.ledger.append(entry)
        self._write_ledger()
        trainer.strategy.barrier()
        position = self.pending.index(k)
        if position + 1 < len(self.pending):
            self._start(trainer, pl_module, self.pending[position + 1], first_epoch=epoch + 1)

    @torch.no_grad()
    def _grams(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """G = X^T X of every adapted layer's inputs over this request's forget tokens, summed over ranks."""
        model = pl_module.model
        grams: dict[str, torch.Tensor] = {}
        valid: dict[str, torch.Tensor] = {}

        def hook(name):
            def capture(module, args):
                x = args[0].reshape(-1, args[0].shape[-1])[valid["mask"]].double()
                grams[name] = grams.get(name, 0) + x.T @ x

            return capture

        layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        was_training = model.training
        model.eval()
        seen: set[int] = set()
        try:
            loader = trainer.datamodule.reference_loader("forget", trainer.global_rank, trainer.world_size)
            for sub in loader:
                sub = {n: v.to(pl_module.device) for n, v in sub.items()}
                keep = torch.tensor([int(i) not in seen for i in sub["index"]], device=pl_module.device)
                seen.update(int(i) for i in sub["index"])
                valid["mask"] = (sub["attention_mask"].bool() & keep[:, None]).reshape(-1)
                model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"])
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if trainer.world_size > 1:
            grams = {n: trainer.strategy.reduce(g, reduce_op="sum") for n, g in grams.items()}
        return {n: g.float().cpu() for n, g in grams.items()}

    def _fuse(self, pl_module: LightningModule, upto: int) -> None:
        requests = [self.dirpath / "requests" / str(k) for k in range(upto + 1)]
        config = json.loads((requests[-1] / "adapter_config.json").read_text())
        if self.mode == "stacked":
            factors, info = load_factors(requests[-1]), {"method": "stacked", "requests": upto + 1}
        else:
            adapters = [load_factors(d) for d in requests]
            grams = [load_file(str(d / "grams.safetensors")) for d in requests]
            factors, info = regmean(adapters, grams, ridge=self.ridge)
            info["requests"] = upto + 1
        if self.fused_rank is not None:
            factors, errors = svd_truncate(factors, self.fused_rank)
            info.update(fused_rank=self.fused_rank, svd_relative_error=errors)
        save_factors(self.dirpath / "fused", factors, config, info)

    def _load_slot(self, pl_module: LightningModule, directory: Path) -> None:
        """Stacked resume: the adapter slot takes the last completed request's weights."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(pl_module.model, load_file(str(directory / "adapter_model.safetensors")))

    def _write_ledger(self, extra: dict | None = None) -> None:
        if not self.writer:
            return
        lines = [json.dumps(e) for e in self.ledger] + ([json.dumps(extra)] if extra else [])
        write_text_atomic(self.dirpath / "ledger.jsonl", "".join(line + "\n" for line in lines))


__all__ = ["ForgetRequest", "SequentialForgetting", "records_hash"]
