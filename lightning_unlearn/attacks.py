"""Does the forgetting hold? Attacks that try to bring forgotten knowledge back; the forget metrics
are measured again on the attacked copy.

- **Quantization** (Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization"):
  unlearning moves weights by less than a quantization step, so rounding them can undo it. Here:
  weight-only round-to-nearest, symmetric, one scale per group of ``group_size`` input weights of
  every linear layer except the output layer (which weight-only schemes such as bitsandbytes keep
  in full precision), through PyTorch's own fake-quantization op. 8 bits with a scale per row,
  4 bits with a scale per 64 weights are the usual settings. RTN is the simplest quantizer; GPTQ
  or AWQ round differently and may recover more.
- **Relearning** (Hu et al. 2024, "Jogging the Memory of Unlearned LLMs Through Targeted
  Relearning Attacks"; Lynch et al. 2024, "Eight Methods to Evaluate Robust Unlearning in LLMs"):
  a few AdamW steps of plain NLL on part of the forget set; an unlearned model whose knowledge was
  hidden rather than removed recovers the rest of the forget set as well, which a model that never
  saw it does not.

Both return a modified copy: the model under evaluation is never touched.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_unlearn.data.collate import pad_batch
from lightning_unlearn.data.formatting import PromptFormat, encode
from lightning_unlearn.errors import UserError


def quantized_copy(model: nn.Module, bits: int, group_size: int | None = None) -> nn.Module:
    """A copy of ``model`` whose linear weights went through a ``bits``-bit round trip: per group of
    ``group_size`` consecutive input weights of a row (None: the whole row), scale = max |w| /
    (2^(bits-1) - 1), w -> clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1) * scale."""
    if not 2 <= bits <= 16:
        raise UserError(f"quantization bits must be in 2..16, got {bits}")
    attacked = copy.deepcopy(model)
    output = attacked.get_output_embeddings() if hasattr(attacked, "get_output_embeddings") else None
    with torch.no_grad():
        for module in attacked.modules():
            if isinstance(module, nn.Linear) and module is not output:
                module.weight.copy_(round_trip(module.weight, bits, group_size))
    return attacked


def round_trip(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """``weight`` [out, in] quantized and dequantized, one symmetric scale per group (see
    ``quantized_copy``); computed in float32 and returned in the weight's dtype."""
    out_dim, in_dim = weight.shape
    group = in_dim if group_size is None else group_size
    if in_dim % group:
        raise UserError(f"quantization group_size {group} does not divide the input width {in_dim}")
    rows = weight.float().reshape(-1, group)  # one scale per row of this view
    q_max = 2 ** (bits - 1) - 1
    scale = (rows.abs().amax(dim=1) / q_max).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.zeros(rows.shape[0], dtype=torch.int32, device=weight.device)
    fake = torch.fake_quantize_per_channel_affine(rows, scale, zero, 0, -q_max - 1, q_max)
    return fake.reshape(out_dim, in_dim).to(weight.dtype)


def relearned_copy(
    model: nn.Module,
    records: list[dict],
    tokenizer,
    prompt_format: PromptFormat,
    steps: int = 10,
    lr: float = 1e-5,
    batch_size: int = 4,
    max_length: int = 256,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` after ``steps`` AdamW steps of mean answer-token NLL on ``records``
    (question/answer rows; batches drawn in a seeded order, cycling), every weight trained."""
    if not records:
        raise UserError("relearning needs at least one record")
    if steps < 1 or batch_size < 1:
        raise UserError(f"relearning needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    attacked = copy.deepcopy(model).train()
    attacked.requires_grad_(True)
    device = next(attacked.parameters()).device
    features = [
        encode(r["question"], r["answer"], tokenizer, prompt_format, max_length, f"relearn row {i}")
        for i, r in enumerate(records)
    ]
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=lr)
    order: list[int] = []
    rng = random.Random(seed)
    for _ in range(steps):
        if len(order) < batch_size:
            more = list(range(len(features)))
            rng.shuffle(more)
            order += more
        chosen, order = order[:batch_size], order[batch_size:]
        batch = pad_batch([features[i] for i in chosen], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        loss = attacked(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return attacked.eval().requires_grad_(False)


def split_for_relearning(records: list[dict], fraction: float = 0.5) -> tuple[list[dict], list[dict]]:
    """The first ``fraction`` of the forget records to relearn on, the rest to measure on."""
    if not 0 < fraction < 1:
        raise UserError(f"relearn fraction must be in (0, 1), got {fraction}")
    if len(records) < 2:
        raise UserError("relearning needs at least 2 forget records: some to train on, some to measure")
    cut = max(1, min(len(records) - 1, round(len(records) * fraction)))
    return records[:cut], records[cut:]


ATTACKS = {"quant8": (8, None), "quant4": (4, 64), "relearn": None}  # name -> (bits, group) or None
ATTACK_METRICS = ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "forget_quality")


def check_attacks(attacks: list[str], where: str = "attacks") -> None:
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise UserError(f"{where}: unknown {unknown}; choose from {', '.join(ATTACKS)}")


@dataclass
class RelearnSettings:
    """The relearning attack: ``steps`` AdamW steps at ``lr`` on the first ``fraction`` of the
    forget records, measured on the rest."""

    steps: int = 10
    lr: float = 1e-5
    batch_size: int = 4
    fraction: float = 0.5


def attack_metrics(
    model: nn.Module,
    attacks: list[str],
    forget: list[dict],
    evaluate: Callable[[nn.Module, list[dict], list[float] | None], dict[str, float]],
    retain_truth_ratios: list[float] | None,
    tokenizer,
    prompt_format: PromptFormat,
    max_length: int,
    relearn: RelearnSettings | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The forget metrics of each attacked copy, as report columns ``<attack>_<metric>``.

    ``evaluate(model, forget_records, retain_truth_ratios)`` returns the metrics of one evaluation
    of the forget role (the caller's Evaluator settings). Quantization is measured on every forget
    record; relearning on the records it did not train on, against the retain model's truth ratios
    of those same records (so forget_quality stays a like-for-like KS test)."""
    check_attacks(attacks)
    columns: dict[str, float] = {}
    for name in attacks:
        if name == "relearn":
            settings = relearn or RelearnSettings()
            train, held_out = split_for_relearning(forget, settings.fraction)
            attacked = relearned_copy(
                model, train, tokenizer, prompt_format, settings.steps, settings.lr,
                settings.batch_size, max_length, seed,
            )  # fmt: skip
            reference = None if retain_truth_ratios is None else retain_truth_ratios[len(train) :]
            metrics = evaluate(attacked, held_out, reference)
        else:
            bits, group = ATTACKS[name]
            metrics = evaluate(quantized_copy(model, bits, group), forget, retain_truth_ratios)
        columns.update({f"{name}_{k}": metrics[k] for k in ATTACK_METRICS if k in metrics})
    return columns
