"""Every unlearning loss as a pure function of tensors (DESIGN section 5).

Conventions: logits are ``[B, T, V]``, labels ``[B, T]`` with -100 on tokens that are not scored,
and position t's logits predict label t+1. Every reduction is a mean over the batch so that DDP's
gradient averaging yields the global mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each label token, ``(logp [B, T-1], mask [B, T-1])``; 0 where masked.

    Uses the fused cross-entropy kernel rather than a materialised log-softmax, which matters at
    a 50k vocabulary.
    """
    shift_logits, shift_labels = _shift(logits, labels)
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.float().reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return -nll, mask


def sequence_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of label-token log-probabilities per sequence, ``[B]`` (no length normalisation)."""
    logp, mask = token_logprobs(logits, labels)
    return (logp * mask).sum(-1)


def mean_token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sequence mean NLL over its label tokens, ``[B]`` (the quantity behind Prob and SimNPO)."""
    logp, mask = token_logprobs(logits, labels)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def nll_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL over all label tokens of the batch (Hugging Face's causal-LM convention)."""
    logp, mask = token_logprobs(logits, labels)
    return -(logp * mask).sum() / mask.sum().clamp_min(1)


def max_entropy_loss(
    logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    positions: str = "answer",
) -> Tensor:
    """KL(U || p) per position, averaged over the chosen positions (closer-look's ME objective).

    KL(U || p) = -log V - (1/V) sum_v log p_v, computed from log_softmax for stability.
    ``positions="answer"`` scores the positions that predict label tokens; ``"sequence"`` every
    position that predicts a real (non-padding) token, as closer-look's TOFU runs did.
    """
    shift_logits, shift_labels = _shift(logits, labels)
    if positions == "answer":
        mask = shift_labels != IGNORE_INDEX
    elif positions == "sequence":
        if attention_mask is None:
            raise ValueError("max_entropy_loss(positions='sequence') needs the attention_mask")
        mask = attention_mask[:, 1:].bool()
    else:
        raise ValueError(f"positions must be 'answer' or 'sequence', got {positions!r}")
    vocab = shift_logits.size(-1)
    log_p = torch.log_softmax(shift_logits.float(), dim=-1)
    kl = -math.log(vocab) - log_p.mean(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """KL(teacher || student) per position, averaged over the positions where ``mask`` is true.

    Both logits are ``[B, T, V]`` and ``mask`` is ``[B, T]`` over the same positions (callers pass
    the shifted label mask). No T^2 rescaling: the loss weight already sets the scale.
    """
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """Negative preference optimisation (Zhang et al., 2024) on sequence log-probs ``[B]``:
    -(2/beta) * mean logsigmoid(-beta * (logp - ref_logp)). Bounded, unlike gradient ascent."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def simnpo_loss(mean_nll: Tensor, beta: float, delta: float = 0.0) -> Tensor:
    """SimNPO (Fan et al., 2024), reference-free: -(2/beta) * mean logsigmoid(beta * (mean_nll - delta)),
    with ``mean_nll`` each sequence's NLL per label token ``[B]`` (open-unlearning's form)."""
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()


def dpo_loss(logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """DPO (Rafailov et al., 2023) with the chosen (w) and rejected (l) sequence log-probs ``[B]``:
    -(2/beta) * mean logsigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)))."""
    return -(2.0 / beta) * F.logsigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l))).mean()


def answer_preservation_loss(logp_answer: Tensor, logp_refusal: Tensor, beta: float) -> Tensor:
    """Closer-look's AP on retain questions, no reference model:
    -(1/beta) * mean logsigmoid(beta * (logp_answer - logp_refusal)); keeps refusals off retain data."""
    return -(1.0 / beta) * F.logsigmoid(beta * (logp_answer - logp_refusal)).mean()
