"""GPU figures from one command: training throughput, MFU and peak memory under each Lightning
strategy, and the Evaluator's scoring and generation speed, on one GPU.

    python benchmarks/gpu.py [--json PATH] [--budget-s 450] [--only SUBSTRING ...]
    python benchmarks/gpu.py --smoke --json PATH   # the same code path at toy size, on the CPU

Why: the project's own figures so far come from a 2-core CPU, and a session lent a GPU gets one
short try at it; so this script measures everything in one run, each strategy in its own worker
process, and always prints a table: a case that fails, hangs or runs past the time budget is
reported as such and the rest go on.

Shapes (models built from configs with random weights, since no weights can be carried to the GPU
machine): SmolLM2-135M (llama, hidden 576, MLP 1536, 30 layers, 9 heads, 3 kv heads, vocabulary
49152, tied embeddings) and Llama-3.2-1B (hidden 2048, MLP 8192, 16 layers, 32 heads, 8 kv heads,
vocabulary 128256, tied embeddings, rope_theta 500000).

Cases (1 GPU each; ``npo_lora`` is NPO with a LoRA r8 on every linear layer and the ``cached``
reference, ``finetune`` the FineTune objective training every weight), both shapes each:

- single device (``auto``): NPO + LoRA and FineTune in bf16-true and bf16-mixed, activation
  checkpointing off; NPO + LoRA and FineTune in bf16-true with checkpointing on.
- FSDP2 (``ModelParallelStrategy``, configs/trainer/fsdp2.yaml): NPO + LoRA and FineTune in
  bf16-true; NPO + LoRA in bf16-mixed, and in bf16-true with checkpointing on (that config's own
  setting).
- ``ddp`` and FSDP (``FSDPStrategy``, configs/trainer/fsdp.yaml): NPO + LoRA in bf16-true and
  bf16-mixed, checkpointing off.
- the Evaluator on the same shapes: ``Evaluator.score`` (every answer variant of a TOFU-like record
  scored, prefix-packed) and ``Evaluator.generate`` (greedy answers, batched), bf16 weights.

The full cross product (objective x strategy x precision x checkpointing x shape: 64 cases) does
not fit the 8 minutes a session can spend; these cover every strategy and precision for NPO +
LoRA, checkpointing where it is usually switched on, and full fine-tuning where its memory goes
(one device and FSDP2). Cases run in this order, most wanted first, so a budget that runs out
drops the least wanted (``--only SUBSTRING`` reruns the cases whose id contains it). The
strategies' settings are read from configs/trainer/*.yaml, with the process count set to 1, so the
figures are those of the shipped configs. Under FSDP and FSDP2 the random weights are drawn on the
GPU (``_InitOnGPU``): drawn on the host, as Lightning's contexts for those strategies leave them,
they made each case's set-up about 35 s on an H200 against about 10 s on one device, and the plan
past 8 minutes. Each result carries ``case_seconds`` (and training cases ``setup_seconds``: model
build, sharding and warm-up steps), so a run shows where its time went.

Each training case is ``Trainer.fit`` on synthetic batches (8 rows of 512 random token ids, all
real, the first 128 a prompt labelled -100; ``Settings``): ``--warmup`` steps (3), then
``--steps`` timed ones (10). A callback synchronises the device when the first timed step starts and
when the last one ends; tokens are the real (attention-mask) tokens of every sub-batch a step
forwards, so an NPO step (forget + retain) counts 2 x batch x seq-len and a FineTune step
batch x seq-len. Peak memory is ``torch.cuda.max_memory_allocated`` over the whole fit (model,
optimiser state, the NPO reference cache, activations), reset at the start of each case.

Model FLOPs per token, with N the parameters of every linear layer of the base model (the output
layer included, the input embedding lookup not; with tied embeddings the shared matrix counts once,
as the output layer) and A the LoRA factors' parameters:

- full fine-tuning: 6 N (forward 2N, backward 2N for the inputs' gradients and 2N for the weights').
- LoRA: 4 N + 6 A (forward 2N and the inputs' gradients 2N through the frozen base, whose weights
  get no gradient; forward, input and weight gradients of the adapter, 6A).

MFU = FLOPs per token x tokens/s / the GPU's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s,
from torch.cuda.get_device_name; ``--peak-tflops`` for others). These are model FLOPs, as MFU is
usually reported: recomputation under activation checkpointing, the attention scores' own FLOPs
and the saving of computing logits only at scored positions are not counted, so the figures are
comparable with other frameworks' MFU rather than a count of what the GPU executed. Training
forwards pack a step's sequences into one row under a block-diagonal mask
(``lightning_unlearn.logits.shared_hidden``): an attention kernel that does not skip the masked
blocks does work quadratic in the packed length, which shows here as a lower MFU.

Evaluator figures: scored sequences/s (each record's answer, paraphrase and perturbed answers) and
generated tokens/s (answer tokens, counted by re-encoding the decoded answers with a word-level
tokenizer whose every word is one model token; special tokens are not counted). Where
``lightning_unlearn.evaluation`` cannot be imported (it needs rouge-score at import, which the GPU
image lacks unless carried as wheels) the same figures are taken with the model directly (padded
batched forwards for scoring, ``model.generate`` for generation) and the row says ``direct``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine gets a copy of the checkout, nothing installed

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import GenerationConfig, PreTrainedTokenizerFast  # noqa: E402

from lightning_unlearn.data.collate import TrainCollator, pad_batch  # noqa: E402
from lightning_unlearn.data.datamodule import (  # noqa: E402
    FineTuneDataModule,
    PairedDataset,
    UnlearningDataModule,
    _Flatten,
)
from lightning_unlearn.data.formatting import PLAIN, encode, encode_prompt  # noqa: E402
from lightning_unlearn.losses import IGNORE_INDEX, mean_token_nll  # noqa: E402
from lightning_unlearn.models import LoraSpec, ModelSpec, attach_lora, load_model  # noqa: E402
from lightning_unlearn.objectives import NPO, FineTune, UnlearningObjective  # noqa: E402

SHAPES: dict[str, dict] = {
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
    },
    # --smoke: a 2-layer llama small enough for a 2-core CPU in seconds
    "tiny": {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "tie_word_embeddings": True,
        "max_position_embeddings": 128,
    },
}
LORA = LoraSpec(r=8, alpha=16, target_modules="all-linear")
# Dense bf16 tensor-core peaks (NVIDIA data sheets), matched against torch.cuda.get_device_name.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
PAD_ID = 0
SPECIAL_WORDS = ["<pad>", "<eos>", "<unk>"]
PROMPT_WORDS = ["Question", "Answer", ":"]  # PLAIN's prompt, so every prompt token is a known word


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the GPU defaults, or ``SMOKE``."""

    batch_size: int = 8
    seq_len: int = 512
    warmup: int = 3
    steps: int = 10
    eval_records: int = 128
    eval_batch_size: int = 16  # questions per scoring forward (the evaluate command's default)
    generation_batch_size: int = 128
    max_new_tokens: int = 200  # the evaluate command's default
    question_words: int = 16
    answer_words: int = 24
    perturbed: int = 5  # TOFU's perturbed answers per question
    case_timeout_s: float = 90.0

    @property
    def prompt_len(self) -> int:
        return self.seq_len // 4


SMOKE = Settings(
    batch_size=2,
    seq_len=32,
    warmup=1,
    steps=2,
    eval_records=4,
    eval_batch_size=2,
    generation_batch_size=4,
    max_new_tokens=4,
    question_words=6,
    answer_words=6,
    perturbed=2,
    case_timeout_s=90.0,
)


@dataclass(frozen=True)
class Case:
    """One measurement. ``objective``: ``npo_lora`` or ``finetune`` (kind ``train``); ``auto``,
    ``evaluator`` or ``direct`` (kind ``eval``: the Evaluator, falling back to the model directly
    under ``auto`` where it cannot be imported)."""

    kind: str
    objective: str
    strategy: str
    precision: str
    checkpointing: bool
    shape: str

    @property
    def id(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "nockpt"
        return f"{self.kind}/{self.objective}/{self.strategy}/{self.precision}/{ckpt}/{self.shape}"


# -- the plan ---------------------------------------------------------------------------------


def train(objective: str, strategy: str, precision: str, ckpt: bool, shapes: list[str]) -> list[Case]:
    return [Case("train", objective, strategy, precision, ckpt, shape) for shape in shapes]


def gpu_plan() -> list[Case]:
    """The full run's cases in priority order (see the module docstring)."""
    s = ["smollm2-135m", "llama-3.2-1b"]
    return [
        *train("npo_lora", "single", "bf16-true", False, s),
        *train("finetune", "single", "bf16-true", False, s),
        *[Case("eval", "auto", "single", "bf16-true", False, shape) for shape in s],
        *train("npo_lora", "single", "bf16-mixed", False, s),
        *train("npo_lora", "single", "bf16-true", True, s),
        *train("finetune", "single", "bf16-mixed", False, s),
        *train("finetune", "single", "bf16-true", True, s),
        *train("npo_lora", "fsdp2", "bf16-true", False, s),
        *train("finetune", "fsdp2", "bf16-true", False, s),
        *train("npo_lora", "fsdp2", "bf16-mixed", False, s),
        *train("npo_lora", "fsdp2", "bf16-true", True, s),
        *train("npo_lora", "ddp", "bf16-true", False, s),
        *train("npo_lora", "ddp", "bf16-mixed", False, s),
        *train("npo_lora", "fsdp", "bf16-true", False, s),
        *train("npo_lora", "fsdp", "bf16-mixed", False, s),
    ]


def smoke_plan() -> list[Case]:
    """The CPU strategies (FSDPStrategy is GPU-only) at toy size, both Evaluator paths."""
    t = ["tiny"]
    return [
        *train("npo_lora", "single", "bf16-true", False, t),
        *train("npo_lora", "single", "bf16-mixed", False, t),
        *train("npo_lora", "single", "bf16-true", True, t),
        *train("finetune", "single", "bf16-true", False, t),
        Case("eval", "evaluator", "single", "bf16-true", False, "tiny"),
        Case("eval", "direct", "single", "bf16-true", False, "tiny"),
        *train("npo_lora", "ddp", "bf16-true", False, t),
        *train("npo_lora", "ddp", "bf16-mixed", False, t),
        *train("npo_lora", "fsdp2", "bf16-true", False, t),
        *train("finetune", "fsdp2", "bf16-true", False, t),
    ]


# -- devices ----------------------------------------------------------------------------------


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"


def peak_tflops(name: str, override: float | None) -> float | None:
    """The dense bf16 peak of the device called ``name`` (None for a CPU or an unknown GPU)."""
    if override is not None:
        return override
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    """Free what the last case left and restart the peak counter from here."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# -- model FLOPs ------------------------------------------------------------------------------


def model_spec(case: Case) -> ModelSpec:
    """The case's model: bf16 weights under bf16-true, float32 masters under bf16-mixed."""
    dtype = "bfloat16" if case.precision == "bf16-true" else "float32"
    return ModelSpec(config=dict(SHAPES[case.shape]), dtype=dtype)


def parameter_counts(spec: ModelSpec, lora: LoraSpec | None) -> dict[str, int]:
    """Counts of the model as the objective builds it, on the meta device (no memory, no init):
    total, trainable, the base's linear layers (N) and the adapter's factors (A)."""
    with torch.device("meta"):
        model = load_model(spec)
        if lora is not None:
            model = attach_lora(model, lora)
    linear = sum(
        sum(p.numel() for p in module.parameters(recurse=False))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and "lora_" not in name
    )
    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "matmul_params": linear,
        "adapter_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
    }


def flops_per_token(matmul_params: int, adapter_params: int, lora: bool) -> int:
    """Model FLOPs per trained token: 4N + 6A with a LoRA (frozen base), else 6N."""
    return 4 * matmul_params + 6 * adapter_params if lora else 6 * matmul_params


# -- strategies -------------------------------------------------------------------------------


def strategy_from_config(name: str):
    """The strategy of configs/trainer/<name>.yaml with its process count set to 1."""
    spec = yaml.safe_load((ROOT / "configs" / "trainer" / f"{name}.yaml").read_text())["trainer"]["strategy"]
    module, _, cls = spec["class_path"].rpartition(".")
    init_args = dict(spec.get("init_args") or {})
    if "data_parallel_size" in init_args:
        init_args.update(data_parallel_size=1, tensor_parallel_size=1)
    if any(isinstance(v, dict) for v in init_args.values()):
        raise ValueError(f"configs/trainer/{name}.yaml: nested class_path values are not supported here")
    return getattr(__import__(module, fromlist=[cls]), cls)(**init_args)


def build_strategy(name: str):
    """``single`` and ``ddp`` by name (as configs/trainer/ddp.yaml names it), FSDP and FSDP2 from
    their configs."""
    return {"single": lambda: "auto", "ddp": lambda: "ddp"}.get(name, lambda: strategy_from_config(name))()


# -- synthetic data ---------------------------------------------------------------------------


def token_rows(n: int, settings: Settings, vocab: int, seed: int) -> list[dict]:
    """``n`` rows of ``seq_len`` random real tokens, the first quarter a prompt labelled -100."""
    ids = torch.randint(1, vocab, (n, settings.seq_len), generator=torch.Generator().manual_seed(seed))
    prompt = settings.prompt_len
    return [{"input_ids": row, "labels": [IGNORE_INDEX] * prompt + row[prompt:]} for row in ids.tolist()]


class SyntheticUnlearningData(UnlearningDataModule):
    """The UnlearningDataModule's own pairing, sampler and reference loader over synthetic rows."""

    def __init__(self, forget: list[dict], retain: list[dict], batch_size: int) -> None:
        super().__init__(tokenizer="synthetic", batch_size=batch_size, max_length=len(forget[0]["input_ids"]))
        self.rows = (forget, retain)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.collator = _Flatten(PAD_ID)
            self.dataset = PairedDataset(*self.rows, seed=0)


class SyntheticFineTuneData(FineTuneDataModule):
    """The FineTuneDataModule's loaders over synthetic rows."""

    def __init__(self, rows: list[dict], batch_size: int) -> None:
        super().__init__(tokenizer="synthetic", batch_size=batch_size, max_length=len(rows[0]["input_ids"]))
        self.rows = rows

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.collator = TrainCollator(PAD_ID)
            self.dataset = self.rows


def build_data(case: Case, settings: Settings) -> L.LightningDataModule:
    """Exactly one epoch of ``warmup + steps`` batches."""
    n = settings.batch_size * (settings.warmup + settings.steps)
    vocab = SHAPES[case.shape]["vocab_size"]
    if case.objective == "finetune":
        return SyntheticFineTuneData(token_rows(n, settings, vocab, 0), settings.batch_size)
    forget, retain = token_rows(n, settings, vocab, 0), token_rows(n, settings, vocab, 1)
    return SyntheticUnlearningData(forget, retain, settings.batch_size)


# Strategies whose ``tensor_init_context`` builds the model on the CPU (they shard it afterwards).
CPU_INIT_STRATEGIES = ("fsdp", "fsdp2")


class _InitOnGPU:
    """Builds the random-weight model on the GPU instead of the CPU.

    Why: under FSDPStrategy and ModelParallelStrategy Lightning calls ``configure_model`` without a
    device context (it expects meta-device or CPU construction followed by sharding), so the
    random initialisation of Llama-3.2-1B's 1.2B weights ran on the host: most of the ~35 s each
    such case spent before its first step. The weights are random either way; only where they are
    drawn changes. FSDP and FSDP2 shard modules whose parameters are already on the GPU as usual.
    """

    def configure_model(self) -> None:
        cuda = torch.cuda.is_available()  # the smoke run takes this path on the CPU
        with torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"):
            super().configure_model()


def build_objective(case: Case) -> UnlearningObjective:
    ckpt = case.checkpointing
    cls = FineTune if case.objective == "finetune" else NPO
    if case.strategy in CPU_INIT_STRATEGIES:
        cls = type(cls.__name__, (_InitOnGPU, cls), {})
    if case.objective == "finetune":
        return cls(model=model_spec(case), activation_checkpointing=ckpt)
    return cls(model=model_spec(case), adapter=LORA, reference="cached", activation_checkpointing=ckpt)


# -- timing -----------------------------------------------------------------------------------


def real_tokens(batch: dict) -> Tensor:
    """Real tokens of a plain batch, or of every sub-batch of an unlearning batch (a device
    tensor: read once the timing is over, so counting adds no synchronisation)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return sum(sub["attention_mask"].sum() for sub in batch.values() if isinstance(sub, dict))


class StepTimer(Callback):
    """Wall time from the start of step ``warmup`` to the end of step ``last`` (the device
    synchronised at both ends), and the real tokens each of those steps forwarded."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last = warmup, last
        self.start: float | None = None
        self.end: float | None = None
        self.tokens: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            synchronize()
            self.start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.tokens.append(real_tokens(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.last:
            synchronize()
            self.end = time.perf_counter()

    def step_tokens(self) -> list[int]:
        return [int(t) for t in self.tokens]


def run_training(case: Case, settings: Settings, peak: float | None) -> dict:
    """Fit ``case`` for ``warmup + steps`` steps; throughput, MFU and peak memory of the timed ones."""
    lora = LORA if case.objective == "npo_lora" else None
    counts = parameter_counts(model_spec(case), lora)
    per_token = flops_per_token(counts["matmul_params"], counts["adapter_params"], lora is not None)
    timer = StepTimer(settings.warmup, settings.warmup + settings.steps - 1)
    began = time.perf_counter()
    objective, data = build_objective(case), build_data(case, settings)
    reset_memory()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="gpu" if torch.cuda.is_available() else "cpu",
            devices=1,
            strategy=build_strategy(case.strategy),
            precision=case.precision,
            max_steps=settings.warmup + settings.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
            default_root_dir=root,
        )
        trainer.fit(objective, datamodule=data)
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"fit ran {trainer.global_step} steps, fewer than the {settings.steps} to time")
    seconds, step_tokens = timer.end - timer.start, timer.step_tokens()
    tokens_per_s = sum(step_tokens) / seconds
    dtype = next((p.dtype for p in objective.parameters() if p.requires_grad), None)
    return {
        **counts,
        "flops_per_token": per_token,
        "sub_batches": 1 if case.objective == "finetune" else 2,
        "timed_steps": len(step_tokens),
        "step_tokens": step_tokens,
        "tokens": sum(step_tokens),
        "seconds": seconds,
        # model build, sharding and the warm-up steps: where a run's time goes besides the timing
        "setup_seconds": timer.start - began,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * seconds / len(step_tokens),
        "mfu": per_token * tokens_per_s / (peak * 1e12) if peak else None,
        "peak_memory_bytes": peak_memory(),
        "trainable_dtype": str(dtype).removeprefix("torch."),
    }


# -- the Evaluator ----------------------------------------------------------------------------


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``vocab`` words (specials, the prompt's words, then
    ``w<i>``): every token id the model can produce decodes to one word and re-encodes to one
    token, so generated answers can be counted from their text."""
    words = SPECIAL_WORDS + PROMPT_WORDS
    words += [f"w{i}" for i in range(vocab - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tofu_like_records(settings: Settings, vocab: int, seed: int = 0) -> list[dict]:
    """Records with TOFU's fields: question, answer, paraphrased and perturbed answers."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab - len(SPECIAL_WORDS + PROMPT_WORDS))]

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    a = settings.answer_words
    return [
        {
            "id": i,
            "question": text(settings.question_words),
            "answer": text(a),
            "paraphrased_answer": text(a),
            "perturbed_answer": [text(a) for _ in range(settings.perturbed)],
        }
        for i in range(settings.eval_records)
    ]


def variants(record: dict) -> list[str]:
    return [record["answer"], record["paraphrased_answer"], *record["perturbed_answer"]]


Scorer = Callable[[list[dict]], int]  # records -> sequences scored (or tokens generated)


def evaluator_passes(
    model, tokenizer, records: list[dict], settings: Settings, notes: dict
) -> tuple[Scorer, Scorer]:
    """Scoring and generation through one ``Evaluator``'s ``score`` and ``generate`` (its one-off
    check that prefix packing scores as plain scoring does runs in the warm-up; whether it did
    goes to ``notes``)."""
    from lightning_unlearn.evaluation import Evaluator  # needs rouge-score (see the docstring)

    # generation_batch_size arrives with the faster Evaluator; an Evaluator without it generates
    # at its scoring batch size.
    extra = {}
    if "generation_batch_size" in inspect.signature(Evaluator).parameters:
        extra["generation_batch_size"] = settings.generation_batch_size
    evaluator = Evaluator(
        tokenizer,
        {"forget": records},
        batch_size=settings.eval_batch_size,
        max_new_tokens=settings.max_new_tokens,
        progress=False,
        distributed=False,
        **extra,
    )

    def score(chunk: list[dict]) -> int:
        nll, _ = evaluator.score(model, chunk, [variants(r) for r in chunk])
        notes["prefix_packed"] = getattr(evaluator, "_packing", None)
        return sum(len(row) for row in nll)

    def generate(chunk: list[dict]) -> int:
        texts = evaluator.generate(model, chunk)
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    return score, generate


def answer_tokens(new_tokens: Tensor, eos: int) -> int:
    """Tokens of each row before its first EOS (all of them where there is none), summed."""
    hit = new_tokens == eos
    first = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), new_tokens.shape[1])
    return int(first.sum())


def direct_passes(
    model, tokenizer, records: list[dict], settings: Settings, notes: dict
) -> tuple[Scorer, Scorer]:
    """The same work with the model directly: padded batched forwards scoring every variant's
    answer tokens, and ``generate`` on left-padded batches of prompts."""
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    @torch.no_grad()
    def score(records: list[dict]) -> int:
        done = 0
        for start in range(0, len(records), settings.eval_batch_size):
            chunk = records[start : start + settings.eval_batch_size]
            feats = [encode(r["question"], a, tokenizer, PLAIN, 512) for r in chunk for a in variants(r)]
            batch = {k: v.to(device) for k, v in pad_batch(feats, tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            done += len(mean_token_nll(logits, batch["labels"]).tolist())
        return done

    @torch.no_grad()
    def generate(records: list[dict]) -> int:
        done = 0
        for start in range(0, len(records), settings.generation_batch_size):
            chunk = records[start : start + settings.generation_batch_size]
            feats = [{"input_ids": encode_prompt(r["question"], tokenizer, PLAIN, 512)} for r in chunk]
            batch = {k: v.to(device) for k, v in pad_batch(feats, tokenizer.pad_token_id, "left").items()}
            out = model.generate(**batch, generation_config=config)
            done += answer_tokens(out[:, batch["input_ids"].shape[1] :], tokenizer.eos_token_id)
        return done

    return score, generate


def timed(fn: Scorer, records: list[dict]) -> tuple[int, float]:
    """``fn(records)`` and its wall time, the device synchronised before and after."""
    synchronize()
    start = time.perf_counter()
    count = fn(records)
    synchronize()
    return count, time.perf_counter() - start


def run_eval(case: Case, settings: Settings, peak: float | None) -> dict:
    """Scored sequences/s and generated tokens/s, each after a warm-up on a few records."""
    config = SHAPES[case.shape]
    tokenizer = word_tokenizer(config["vocab_size"])
    records = tofu_like_records(settings, config["vocab_size"])
    reset_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 weights on a GPU; float32 on a CPU, where bf16 matmuls are often emulated
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    with device:
        model = load_model(ModelSpec(config=dict(config), dtype=dtype)).eval()
    path = case.objective
    if path == "auto":
        try:
            import lightning_unlearn.evaluation  # noqa: F401
        except ImportError:
            path = "direct"
        else:
            path = "evaluator"
    notes: dict = {}
    passes = evaluator_passes if path == "evaluator" else direct_passes
    score, generate = passes(model, tokenizer, records, settings, notes)
    warm = records[: max(1, settings.eval_batch_size // 2)]
    score(warm)
    generate(warm)
    sequences, score_s = timed(score, records)
    generated, generate_s = timed(generate, records)
    return {
        "path": path,
        "records": len(records),
        "variants_per_record": 2 + settings.perturbed,
        "scored_sequences": sequences,
        "score_seconds": score_s,
        "sequences_per_s": sequences / score_s,
        "generated_tokens": generated,
        "generate_seconds": generate_s,
        "generated_tokens_per_s": generated / generate_s,
        "max_new_tokens": settings.max_new_tokens,
        "peak_memory_bytes": peak_memory(),
        **notes,
    }


# -- worker: runs its cases in order, one JSON line per event ---------------------------------


def emit(events: Path, record: dict) -> None:
    with events.open("a") as f:
        f.write(json.dumps(record) + "\n")


def device_healthy() -> bool:
    """Whether the device still runs work after a failed case (an OOM leaves it usable; a
    device-side error does not, and the parent then starts a fresh worker)."""
    if not torch.cuda.is_available():
        return True
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:
        return False
    return True


def worker(plan: Path, events: Path) -> int:
    spec = json.loads(plan.read_text())
    settings, deadline = Settings(**spec["settings"]), spec["deadline"]
    name = device_name()
    peak = peak_tflops(name, spec["peak_tflops"])
    for item in spec["cases"]:
        case = Case(**item)
        if time.time() > deadline:
            emit(events, {"event": "result", "id": case.id, "status": "skipped", "error": "time budget"})
            continue
        emit(events, {"event": "start", "id": case.id, "time": time.time()})
        base = {"event": "result", "id": case.id, "device": name, "peak_tflops": peak}
        try:
            run = run_eval if case.kind == "eval" else run_training
            began = time.perf_counter()
            figures = run(case, settings, peak)
            emit(events, {**base, "status": "ok", **figures, "case_seconds": time.perf_counter() - began})
        except Exception as err:  # one failed case must not cost the others: record it and go on
            emit(events, {**base, "status": "error", "error": f"{type(err).__name__}: {str(err)[:500]}"})
            if not device_healthy():
                return 3
        finally:
            reset_memory()
    return 0


# -- parent: one worker per strategy, watched ---------------------------------------------------


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def watch(proc: subprocess.Popen, events: Path, deadline: float, case_timeout: float) -> str | None:
    """Wait for the worker; kill it (its whole process group) if one case outlives
    ``case_timeout`` or the run outlives ``deadline``. Returns why it was killed, or None."""
    while proc.poll() is None:
        log = read_events(events)
        done = {e["id"] for e in log if e["event"] == "result"}
        running = [e for e in log if e["event"] == "start" and e["id"] not in done]
        now = time.time()
        reason = "time budget" if now > deadline else None
        if running and now - running[-1]["time"] > case_timeout:
            reason = f"case timeout ({case_timeout:.0f} s)"
        if reason:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return reason
        time.sleep(0.5)
    return None


def run_group(cases: list[Case], spec: dict, work: Path, tag: str) -> dict[str, dict]:
    """Run ``cases`` (one strategy) in worker processes until each has a result. A worker that
    dies has its running case recorded as failed and a fresh one takes the rest; one killed (a
    case hung, or the budget ran out) ends the group: a hang, such as a collective that never
    returns, would most likely hang the strategy's next case too."""
    results: dict[str, dict] = {}
    for attempt in range(len(cases)):
        pending = [c for c in cases if c.id not in results]
        if not pending:
            break
        plan, events, log = (work / f"{tag}-{attempt}.{ext}" for ext in ("plan.json", "events.jsonl", "log"))
        plan.write_text(json.dumps({**spec, "cases": [asdict(c) for c in pending]}))
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(plan), str(events)]
        with log.open("w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            killed = watch(proc, events, spec["deadline"], spec["settings"]["case_timeout_s"])
        log_events = read_events(events)
        for event in log_events:
            if event.pop("event") == "result":
                results[event["id"]] = event
        why = killed or f"worker exited with code {proc.returncode}"
        for event in log_events:
            if event["id"] not in results:  # started, never finished
                results[event["id"]] = {
                    "id": event["id"],
                    "status": "error",
                    "error": why,
                    "log_tail": log_tail(log),
                }
        if killed or not log_events:
            for case in pending:
                results.setdefault(case.id, {"id": case.id, "status": "skipped", "error": why})
            if not log_events:
                results[pending[0].id]["log_tail"] = log_tail(log)
            break
    return results


def run_all(
    cases: list[Case],
    settings: Settings,
    peak: float | None,
    budget_s: float,
    progress: Callable[[list[dict]], None],
) -> list[dict]:
    """Every case, grouped by strategy in order of first appearance; results in plan order, also
    handed to ``progress`` after each group (so a run cut short still leaves its figures)."""
    spec = {"settings": asdict(settings), "deadline": time.time() + budget_s, "peak_tflops": peak}
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.strategy, []).append(case)
    results: dict[str, dict] = {}

    def ordered() -> list[dict]:
        return [{**asdict(c), "id": c.id, **results.get(c.id, {"status": "pending"})} for c in cases]

    with tempfile.TemporaryDirectory() as tmp:
        for strategy, group in groups.items():
            results.update(run_group(group, spec, Path(tmp), strategy))
            progress(ordered())
    return ordered()


# -- report -----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def status(r: dict) -> str:
    """``ok``, or the status with the start of its error, fit for a table cell."""
    if r["status"] == "ok":
        return "ok"
    error = " ".join(r.get("error", "").split()).replace("|", "/")
    return f"{r['status']}: {error[:80]}"


def markdown(report: dict) -> str:
    train_rows = [r for r in report["cases"] if r["kind"] == "train"]
    eval_rows = [r for r in report["cases"] if r["kind"] == "eval"]
    peak = report["peak_tflops"]
    lines = [
        f"device: {report['device']}; peak {fmt(peak, '.0f')} TFLOP/s bf16; torch {report['versions']['torch']}, "
        f"lightning {report['versions']['lightning']}; batch {report['settings']['batch_size']} x "
        f"{report['settings']['seq_len']} tokens, {report['settings']['steps']} timed steps after "
        f"{report['settings']['warmup']}",
        "",
        "| objective | strategy | precision | act. ckpt | shape | tokens/step | tokens/s | step ms | MFU | peak GiB | status |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in train_rows:
        per_step = r["tokens"] // r["timed_steps"] if r.get("timed_steps") else None
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(
            f"| {r['objective']} | {r['strategy']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['shape']} | {fmt(per_step, 'd')} | {fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {fmt(r.get('step_ms'), '.1f')} | {fmt(mfu, '.1f')}{'%' if mfu is not None else ''} "
            f"| {gib(r.get('peak_memory_bytes'))} | {status(r)} |"
        )
    lines += [
        "",
        "| Evaluator | shape | scored sequences/s | generated tokens/s | peak GiB | status |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in eval_rows:
        lines.append(
            f"| {r.get('path', r['objective'])} | {r['shape']} | {fmt(r.get('sequences_per_s'), ',.1f')} "
            f"| {fmt(r.get('generated_tokens_per_s'), ',.1f')} | {gib(r.get('peak_memory_bytes'))} | {status(r)} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "lightning": L.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU strategies")
    parser.add_argument("--json", type=Path, help="also write the full results here")
    parser.add_argument("--budget-s", type=float, help="stop the run after this long (450; smoke 150)")
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        help="run only cases whose id contains one of these (repeatable)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not detected")
    parser.add_argument("--steps", type=int, help="timed steps per case")
    parser.add_argument("--warmup", type=int, help="untimed steps before them")
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("PLAN", "EVENTS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    settings = SMOKE if args.smoke else Settings()
    overrides = {k: getattr(args, k) for k in ("steps", "warmup") if getattr(args, k) is not None}
    settings = replace(settings, **overrides)
    cases = smoke_plan() if args.smoke else gpu_plan()
    if args.only:
        cases = [c for c in cases if any(part in c.id for part in args.only)]
    budget = args.budget_s or (150.0 if args.smoke else 450.0)
    started = time.time()

    def report(results: list[dict]) -> dict:
        devices = [r["device"] for r in results if "device" in r]
        name = devices[0] if devices else "unknown (no case ran)"
        return {
            "mode": "smoke" if args.smoke else "gpu",
            "device": name,
            "peak_tflops": peak_tflops(name, args.peak_tflops),
            "versions": versions(),
            "settings": asdict(settings),
            "shapes": {s: SHAPES[s] for s in dict.fromkeys(c.shape for c in cases)},
            "lora": asdict(LORA),
            "wall_s": time.time() - started,
            "cases": results,
        }

    printed: set[str] = set()

    def progress(results: list[dict]) -> None:
        for r in results:
            if r["status"] != "pending" and r["id"] not in printed:
                printed.add(r["id"])
                rate = r.get("tokens_per_s") or r.get("generated_tokens_per_s")
                print(
                    f"[{time.time() - started:4.0f} s] {r['id']}: {status(r)} {fmt(rate, ',.0f')}",
                    file=sys.stderr,
                )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report(results), indent=1))

    results = run_all(cases, settings, args.peak_tflops, budget, progress)
    print(markdown(report(results)))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
