"""SequentialForgetting: a schedule of deletion requests inside one ``Trainer.fit``.

Each request trains the objective's LoRA adapter for ``epochs_per_request`` epochs on that
request's forget records, then records the Gram matrix of the inputs of every adapted linear layer
over those records, saves the adapter and its Grams, appends to the ledger and fuses every request
so far. ``independent`` (EUL) re-initialises the one adapter slot for every request, so each adapter
is trained on the frozen base and the fused adapter combines them in closed form; ``stacked``
(continual unlearning) keeps training the same slot, so request k starts where k-1 ended and the
fused adapter is simply the latest one. The set of trainable parameters never changes, which is
what DDP and FSDP need once they have wrapped the model.

With an ``UnlearningEvaluation`` callback in the Trainer, the fused model (base + fused adapter) is
evaluated after every request instead of the callback's own periodic evaluations, and each
request's forget truth ratio, ROUGE and (with the retain model's report) forget quality over its
own records go into its ledger line beside model utility: the continual-unlearning table.

Files under ``dirpath``: ``requests/<k>/`` (peft adapter, ``grams.safetensors``: one Gram per
distinct layer input, an exact factor when the request has fewer tokens than the layer has inputs,
see ``adapters.save_grams``; ``request.json``), ``fused/`` (peft adapter, ``fusion.json``),
``ledger.jsonl`` (one line per request). Run directories written before Grams were factored (one
dense Gram per module) still load and resume. Every write is atomic. Rerunning the same command after a crash skips the requests
the ledger marks done (their records must hash the same) and continues with the next.

A preemption signal (``preemption``) stops the request at the end of an optimiser step with
Lightning's checkpoint of that step written to ``preempted.ckpt`` in ``dirpath`` (adapter slot,
optimiser, schedule, loop counters, the loader's position in the epoch, and this callback's state:
the current request and where this fit's epoch numbering began). The rerun (``SafeTrainer.fit``
without a ``ckpt_path``) resumes from it inside the request, so the fused adapter equals an
uninterrupted run's; it is deleted when that request is done. Nothing accumulates while a request
trains (its Grams are recorded by a separate pass at its end), so nothing else needs saving.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from safetensors.torch import load_file

from lightning_unlearn.adapters import (
    Factors,
    Gram,
    RegMeanSums,
    factor_of_rows,
    factors_applied,
    load_factors,
    load_grams,
    save_factors,
    save_grams,
    svd_truncate,
)
from lightning_unlearn.callbacks.evaluation import UnlearningEvaluation
from lightning_unlearn.callbacks.sequential_interface import AdapterObjective, RequestData, require
from lightning_unlearn.data.records import load_records
from lightning_unlearn.errors import UserError
from lightning_unlearn.export import write_model
from lightning_unlearn.io import atomic_directory, write_text_atomic
from lightning_unlearn.metrics.tofu import forget_quality, forget_truth_ratio
from lightning_unlearn.report import Report
from lightning_unlearn.seeds import stream_seed
from lightning_unlearn.sharding import full_state_dict, set_full_

MODES = ("independent", "stacked")
PREEMPTED = "preempted.ckpt"  # in dirpath: a preempted request's step (a file, or a sharded directory)


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


def request_metrics(
    report: Report,
    forget: list[dict],
    retain: Sequence[float] | None,
    requests: dict[str, list[dict]],
) -> dict[str, float]:
    """Each request's forget metrics over its own records of the evaluated ``forget`` split
    (matched by question): ``forget_truth_ratio/<name>``, ``forget_Q_A_ROUGE/<name>`` and, given
    the retain model's per-sample forget truth ratios, ``forget_quality/<name>`` (KS test of the
    same records' truth ratios under the two models)."""
    if retain is not None and len(retain) != len(forget):
        raise UserError(
            f"the retain model's report has {len(retain)} forget truth ratios for {len(forget)} forget questions"
        )
    position = {r["question"]: i for i, r in enumerate(forget)}
    truth_ratios = report.per_sample.get("forget_truth_ratio")
    rouge = report.per_sample.get("forget_Q_A_ROUGE")
    out: dict[str, float] = {}
    for name, records in requests.items():
        rows = [position[r["question"]] for r in records if r["question"] in position]
        if not rows:
            continue
        if truth_ratios is not None:
            mine = [truth_ratios[i] for i in rows]
            out[f"forget_truth_ratio/{name}"] = forget_truth_ratio(torch.tensor(mine))
            if retain is not None:
                out[f"forget_quality/{name}"] = forget_quality(mine, [retain[i] for i in rows])
        if rouge is not None:
            out[f"forget_Q_A_ROUGE/{name}"] = sum(rouge[i] for i in rows) / len(rows)
    return out


def reset_lora_(model: torch.nn.Module) -> None:
    """A fresh adapter slot, drawn as peft draws it (A ~ kaiming uniform with a = sqrt(5), B = 0)
    but on full tensors from the global RNG, so every rank of a sharded model draws the same
    matrix and keeps its own shard of it."""
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters") and hasattr(module, "lora_A"):
            for name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                full_a = torch.empty(a.shape, dtype=a.dtype)
                torch.nn.init.kaiming_uniform_(full_a, a=math.sqrt(5))
                set_full_(a, full_a)
                set_full_(b, torch.zeros(b.shape, dtype=b.dtype))


class InputCapture:
    """Forward pre-hooks that collect the inputs of every adapted linear layer over a request's
    tokens, once per distinct input. Layers handed the very same tensor (same object, unmodified)
    in one forward read the same data: q/k/v read one normed hidden state, gate/up another. That is
    found by identity, not by name, so it holds for any architecture; such layers get one Gram,
    recorded under the first of them to run. Each input keeps its rows X while it has fewer than
    in_dim of them (X^T X then has an exact factor thinner than itself), else their dense X^T X."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.count: dict[str, int] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.mask = torch.zeros(0, dtype=torch.bool)
        self.batch: dict[int, tuple[weakref.ref, int, str]] = {}

    def new_batch(self, mask: torch.Tensor) -> None:
        """The next forward; ``mask`` selects its rows (tokens) to record."""
        self.mask = mask
        self.batch.clear()

    def hook(self, name: str) -> Callable[[torch.nn.Module, tuple], None]:
        def capture(module, args) -> None:
            self.record(name, args[0])

        return capture

    def record(self, name: str, x: torch.Tensor) -> None:
        # A weak reference, so a tensor freed in this forward and another allocated at the same
        # address (same id) are never taken for one another; its version counter rules out an
        # in-place change between the two reads.
        seen = self.batch.get(id(x))
        first = seen[2] if seen is not None and seen[0]() is x and seen[1] == x._version else name
        if first == name:
            self.batch[id(x)] = (weakref.ref(x), x._version, name)
        if self.owner.setdefault(name, first) != first:
            raise UserError(f"'{name}' read the input of '{self.owner[name]}' in one forward, not in another")
        if first != name:
            return
        rows = x.reshape(-1, x.shape[-1])[self.mask].double()
        self.count[name] = self.count.get(name, 0) + rows.shape[0]
        self.rows.setdefault(name, []).append(rows)
        if name in self.dense or self.count[name] >= x.shape[-1]:
            self.fold(name)

    def fold(self, name: str) -> torch.Tensor:
        """The dense Gram of ``name``'s input, with its kept rows added in."""
        for x in self.rows.pop(name, []):
            if name not in self.dense:
                self.dense[name] = x.new_zeros(x.shape[1], x.shape[1])
            self.dense[name] += x.T @ x
        return self.dense[name]

    def grams(self, strategy, world_size: int) -> dict[str, Gram]:
        """Every layer's Gram over all ranks, float32 on the CPU. An input with fewer rows than
        in_dim over all ranks gets the factor of its rows gathered from every rank (exact, and the
        same whatever the rank count); otherwise the ranks' dense Grams are summed."""
        owners = [name for name, first in self.owner.items() if name == first]
        counts = torch.tensor([self.count[name] for name in owners], device=self.mask.device)
        counts = strategy.all_gather(counts).reshape(world_size, -1) if world_size > 1 else counts[None]
        grams: dict[str, Gram] = {}
        for i, name in enumerate(owners):
            in_dim = (self.dense[name] if name in self.dense else self.rows[name][0]).shape[1]
            if int(counts[:, i].sum()) < in_dim:
                rows = _gather_rows(torch.cat(self.rows[name]), counts[:, i], strategy, world_size)
                grams[name] = Gram(factor=factor_of_rows(rows).float().cpu())
            else:
                dense = self.fold(name)
                dense = strategy.reduce(dense, reduce_op="sum") if world_size > 1 else dense
                grams[name] = Gram(dense=dense.float().cpu())
        return {name: grams[first] for name, first in self.owner.items()}


def _gather_rows(rows: torch.Tensor, counts: torch.Tensor, strategy, world_size: int) -> torch.Tensor:
    """Every rank's rows, rank by rank (``counts``: how many each has): padded to the largest
    count for the all-gather, the padding dropped again."""
    if world_size == 1:
        return rows
    padded = rows.new_zeros(int(counts.max()), rows.shape[1])
    padded[: rows.shape[0]] = rows
    gathered = strategy.all_gather(padded).reshape(world_size, -1, rows.shape[1])
    return torch.cat([gathered[r, : int(counts[r])] for r in range(world_size)])


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
        self.base = 0  # the request at this fit's epoch 0: request k trains epochs (k - base) * E ...
        self.resumed: dict | None = None  # this callback's state in the preempted checkpoint resumed from

    @property
    def checkpoint_path(self) -> Path:
        """Where a preempted request saves its step (``Preemption``) and the rerun resumes from."""
        return self.dirpath / PREEMPTED

    def resume_checkpoint(self) -> Path | None:
        """The preempted request's checkpoint, if there is one (``SafeTrainer.fit`` resumes from it)."""
        return self.checkpoint_path if self.checkpoint_path.exists() else None

    def state_dict(self) -> dict:
        if getattr(self, "current", None) is None:
            return {}
        return {
            "request": self.current,
            "sha256": records_hash(self.records[self.current]),
            "base": self.base,
            "started": self.started,
            "train_seconds": time.perf_counter() - self.started_perf,
        }

    # -- schedule and resume -------------------------------------------------------------------
    def _records(self, datamodule: RequestData, request: ForgetRequest) -> list[dict]:
        if (request.ids is None) == (request.file is None):
            raise UserError(f"request '{request.name}': give exactly one of ids or file")
        if request.file is not None:
            return load_records(request.file)
        return datamodule.records_by_id(request.ids)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require(pl_module, AdapterObjective, "objective")
        if pl_module.adapter_spec is None:
            raise UserError(
                "SequentialForgetting trains one LoRA adapter per request: give the objective an adapter"
            )
        if trainer.datamodule is None:
            raise UserError("SequentialForgetting needs a data module (an UnlearningDataModule) in fit")
        require(trainer.datamodule, RequestData, "data module")
        datamodule: RequestData = trainer.datamodule
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
        self.current, self.base = None, len(done)
        self.resumed = self._preempted_state(len(done))
        if self.resumed is not None:  # the epoch numbering of the fit that was preempted goes on
            self.base = self.resumed["base"]
        self.evaluation = next((c for c in trainer.callbacks if isinstance(c, UnlearningEvaluation)), None)
        if self.evaluation is not None:
            self.evaluation.periodic = False  # we evaluate the fused model after each request instead
        # Set before the optimiser set-up: a schedule sized by the stepping batches must come out as
        # the preempted fit's did.
        trainer.fit_loop.max_epochs = (len(self.requests) - self.base) * self.epochs_per_request
        trainer.reload_dataloaders_every_n_epochs = 1  # each request brings its own forget set
        if self.pending:  # the data first: the optimiser set-up sizes itself from it
            trainer.datamodule.set_forget(self.records[self.pending[0]])

    def _preempted_state(self, k: int) -> dict | None:
        """This callback's state in the preempted checkpoint, checked to be of request ``k`` (the
        first not done) with the same records; None without one. Read before Lightning restores it,
        because the epoch count it holds sizes the fit."""
        path = self.resume_checkpoint()
        if path is None:
            return None
        file = path / "meta.pt" if path.is_dir() else path  # a sharded checkpoint keeps it in meta.pt
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # cut short, not ours
            raise UserError(
                f"{path}: unreadable ({type(err).__name__}); delete it to restart the request"
            ) from None
        state = state.get("callbacks", {}).get(self.state_key) or {}
        same = k < len(self.requests) and state.get("sha256") == records_hash(self.records[k])
        if state.get("request") != k or not same:
            raise UserError(
                f"{path}: saved in request {state.get('request')}, but the ledger's next request is {k} "
                "(or its records changed); delete it to restart that request"
            )
        return state

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The model exists now (configure_model ran); the objective's own on_fit_start comes next.
        self.sums = RegMeanSums()
        if self.ledger and trainer.is_global_zero:
            if self.mode == "independent":  # resumed: the running sums of the completed requests
                for k in range(len(self.ledger)):
                    self._add_to_sums(self.dirpath / "requests" / str(k))
            # A kill can fall between replacing fused/ and the ledger line: make fused/ match the ledger.
            fusion = self.dirpath / "fused" / "fusion.json"
            if not fusion.is_file() or json.loads(fusion.read_text()).get("requests") != len(self.ledger):
                self._fuse(upto=len(self.ledger) - 1)
        if self.pending and self.resumed is not None:
            self._resume(trainer, self.pending[0])
        elif self.pending:
            if self.mode == "stacked" and self.ledger:
                self._load_slot(pl_module, self.dirpath / "requests" / str(len(self.ledger) - 1))
            self._start(trainer, pl_module, self.pending[0], first_epoch=0)

    def _resume(self, trainer: Trainer, k: int) -> None:
        """Continue request k from the preempted checkpoint: Lightning restores the adapter slot,
        optimiser, schedule, loop counters, loader position and the objective's reference cache;
        here only what points the data at the request (its epochs started at ``first``)."""
        first = (k - self.base) * self.epochs_per_request
        trainer.datamodule.set_forget(self.records[k])
        trainer.datamodule.epoch_offset = first
        self.current, self.started = k, self.resumed["started"]
        self.started_perf = time.perf_counter() - self.resumed["train_seconds"]
        self._write_ledger(extra={"index": k, "name": self.requests[k].name, "status": "running"})

    def _start(self, trainer: Trainer, pl_module: LightningModule, k: int, first_epoch: int) -> None:
        """Point the data at request k, seed it, and (independent) re-initialise the adapter slot."""
        datamodule = trainer.datamodule
        datamodule.set_forget(self.records[k])
        datamodule.epoch_offset = first_epoch
        torch.manual_seed(stream_seed(self.seed, k))
        if self.mode == "independent":
            reset_lora_(pl_module.model)
            if hasattr(pl_module, "forget_last_good"):
                pl_module.forget_last_good()
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        if getattr(pl_module, "reference_policy", None) == "cached" and pl_module.reference_cache:
            pl_module.reference_cache = {}
            pl_module.build_reference_cache(datamodule)
        self.current, self.started, self.started_perf = k, time.time(), time.perf_counter()
        self._write_ledger(extra={"index": k, "name": self.requests[k].name, "status": "running"})

    # -- per request -----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.epochs_per_request:
            return
        k = self.current
        clock = [time.perf_counter()]
        seconds = {"train": clock[0] - self.started_perf}

        def lap(name: str) -> None:
            clock.append(time.perf_counter())
            seconds[name] = clock[-1] - clock[-2]

        grams = self._grams(trainer, pl_module)
        adapter = full_state_dict(pl_module.model, keep=lambda name: "lora_" in name)  # every rank
        lap("grams")
        metrics = {n: float(v) for n, v in trainer.callback_metrics.items() if n.startswith("train/")}
        request_dir = self.dirpath / "requests" / str(k)
        if trainer.is_global_zero:
            with atomic_directory(request_dir) as tmp:
                write_model(tmp, pl_module.model, state_dict=adapter)
                save_grams(tmp / "grams.safetensors", grams)
                request = {**asdict(self.requests[k]), "index": k, "sha256": records_hash(self.records[k])}
                write_text_atomic(tmp / "request.json", json.dumps(request, indent=1) + "\n")
            lap("save")
            if self.mode == "independent":
                self._add_to_sums(request_dir)
            fused = self._fuse(upto=k)
            lap("fuse")
        if self.evaluation is not None:
            metrics.update(self._evaluate(trainer, pl_module, fused if trainer.is_global_zero else None, k))
            lap("evaluate")
        entry = {
            "index": k,
            "name": self.requests[k].name,
            "ids": [str(r.get("id")) for r in self.records[k]],
            "sha256": records_hash(self.records[k]),
            "start": self.started,
            "end": time.time(),
            "status": "done",
            "metrics": metrics,
            "seconds": {name: round(value, 3) for name, value in seconds.items()},
        }
        if trainer.is_global_zero:  # the request is done: its preempted step is stale from here on
            self._remove_preempted()
        self.ledger.append(entry)
        self._write_ledger()
        trainer.strategy.barrier()
        position = self.pending.index(k)
        if position + 1 < len(self.pending):
            self._start(trainer, pl_module, self.pending[position + 1], first_epoch=epoch + 1)

    @torch.no_grad()
    def _grams(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Gram]:
        """G = X^T X of every adapted layer's inputs over this request's forget tokens, over all
        ranks: one ``Gram`` per distinct input (an exact factor or dense), shared by the layers
        that read it."""
        model = pl_module.model
        capture = InputCapture()
        layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
        handles = [m.register_forward_pre_hook(capture.hook(n)) for n, m in layers.items()]
        was_training = model.training
        model.eval()
        seen: set[int] = set()
        try:
            loader = trainer.datamodule.reference_loader("forget", trainer.global_rank, trainer.world_size)
            for sub in loader:
                sub = {n: v.to(pl_module.device) for n, v in sub.items()}
                keep = torch.tensor([int(i) not in seen for i in sub["index"]], device=pl_module.device)
                seen.update(int(i) for i in sub["index"])
                capture.new_batch((sub["attention_mask"].bool() & keep[:, None]).reshape(-1))
                model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"])
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return capture.grams(trainer.strategy, trainer.world_size)

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, fused: Factors | None, k: int) -> dict:
        """Evaluate base + fused adapter on every rank; the ledger's per-request metrics."""
        report_metrics = {}
        if self.mode == "stacked":  # the fused adapter is the live slot itself
            report = self.evaluation.evaluate(trainer, pl_module)
        else:
            fused = trainer.strategy.broadcast(fused, src=0)
            with factors_applied(pl_module.model, fused):
                report = self.evaluation.evaluate(trainer, pl_module)
        for name in ("forget_quality", "forget_truth_ratio", "model_utility", "forget_Q_A_ROUGE"):
            if name in report.metrics:
                report_metrics[f"eval/{name}"] = report.metrics[name]
        so_far = {self.requests[j].name: self.records[j] for j in range(k + 1)}
        evaluator = self.evaluation.evaluator
        per_request = request_metrics(
            report, evaluator.splits.get("forget", []), evaluator.retain_truth_ratios, so_far
        )
        return {**report_metrics, **{f"eval/{n}": v for n, v in per_request.items()}}

    def _add_to_sums(self, request_dir: Path) -> None:
        """Add a saved request to RegMean's running sums (read back from disk, so a resumed run sums
        exactly what an uninterrupted one did)."""
        self.sums.add(load_factors(request_dir), load_grams(request_dir / "grams.safetensors"))

    def _fuse(self, upto: int) -> Factors:
        """Write fused/ for requests 0..upto: RegMean over the running sums (independent) or the
        latest adapter (stacked), optionally SVD-truncated."""
        last = self.dirpath / "requests" / str(upto)
        config = json.loads((last / "adapter_config.json").read_text())
        if self.mode == "stacked":
            factors, info = load_factors(last), {"method": "stacked", "requests": upto + 1}
        else:
            factors, info = self.sums.fuse(self.ridge)
        if self.fused_rank is not None:
            factors, errors = svd_truncate(factors, self.fused_rank)
            info.update(fused_rank=self.fused_rank, svd_relative_error=errors)
        save_factors(self.dirpath / "fused", factors, config, info)
        return factors

    def _remove_preempted(self) -> None:
        path = self.checkpoint_path
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)

    def _load_slot(self, pl_module: LightningModule, directory: Path) -> None:
        """Stacked resume: the adapter slot takes the last completed request's weights (peft's file
        names drop the adapter name that the live parameters carry)."""
        saved = load_file(str(directory / "adapter_model.safetensors"))
        for name, param in pl_module.model.named_parameters():
            key = name.replace(".default.", ".")
            if key in saved:
                set_full_(param, saved[key])

    def _write_ledger(self, extra: dict | None = None) -> None:
        if not self.writer:
            return
        lines = [json.dumps(e) for e in self.ledger] + ([json.dumps(extra)] if extra else [])
        write_text_atomic(self.dirpath / "ledger.jsonl", "".join(line + "\n" for line in lines))


__all__ = ["ForgetRequest", "SequentialForgetting", "records_hash"]
