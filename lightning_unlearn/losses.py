"""Every unlearning loss as a pure function of tensors (DESIGN section 5).

Conventions: logits are ``[B, T, V]``, labels ``[B, T]`` with -100 on tokens that are not scored,
and position t's logits predict label t+1. Every reduction is a mean over the batch so that DDP's
gradient averaging yields the global mean: a mean over sequences as it is (every rank has as many
rows), a mean over tokens through ``num_tokens`` (the mean token count per rank, see ``_token_mean``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return logits[:, :-1, :], labels[:, 1:]


def label_mask(labels: Tensor) -> Tensor:
    """The positions every label-token loss scores, ``[B, T-1]``: those predicting a label token."""
    return labels[:, 1:] != IGNORE_INDEX


def _token_mean(values: Tensor, mask: Tensor, num_tokens: Tensor | float | None) -> Tensor:
    """Sum of ``values`` over ``mask`` divided by ``num_tokens`` (None: the mask's own count).

    Under DDP a per-rank token mean makes the gradient average depend on how tokens fall across
    ranks; dividing by the mean count per rank instead makes it the global token mean."""
    mask = mask.to(values.dtype)
    denominator = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
    return (values * mask).sum() / denominator


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each label token, ``(logp [B, T-1], mask [B, T-1])``; 0 where masked.

    Uses the fused cross-entropy kernel rather than a materialised log-softmax, which matters at
    a 50k vocabulary. Half-precision logits are upcast to float32; float64 stays float64 (the
    influence tests compare against exact solves).
    """
    shift_logits, shift_labels = _shift(logits, labels)
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.to(torch.promote_types(shift_logits.dtype, torch.float32)).reshape(
            -1, shift_logits.size(-1)
        ),
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


def nll_loss(logits: Tensor, labels: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """Mean NLL over all label tokens of the batch (Hugging Face's causal-LM convention); the sum is
    divided by ``num_tokens`` when given (under DDP: the mean token count per rank, so that DDP's
    gradient average is the global token mean whatever the world size)."""
    logp, mask = token_logprobs(logits, labels)
    return -_token_mean(logp, mask, num_tokens)


def max_entropy_positions(labels: Tensor, attention_mask: Tensor | None, positions: str) -> Tensor:
    """The positions ``max_entropy_loss`` scores, ``[B, T-1]``: ``answer``, those predicting label
    tokens; ``sequence``, those predicting a real (non-padding) token."""
    if positions == "answer":
        return label_mask(labels)
    if positions == "sequence":
        if attention_mask is None:
            raise ValueError("max_entropy_loss(positions='sequence') needs the attention_mask")
        return attention_mask[:, 1:].bool()
    raise ValueError(f"positions must be 'answer' or 'sequence', got {positions!r}")


def max_entropy_loss(
    logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    positions: str = "answer",
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """KL(U || p) per position, averaged over the chosen positions (closer-look's ME objective).

    KL(U || p) = -log V - (1/V) sum_v log p_v, computed from log_softmax for stability.
    ``positions="answer"`` scores the positions that predict label tokens; ``"sequence"`` every
    position that predicts a real (non-padding) token, as closer-look's TOFU runs did.
    ``num_tokens``: the denominator (default: the number of those positions; see ``_token_mean``).
    """
    mask = max_entropy_positions(labels, attention_mask, positions)
    shift_logits = logits[:, :-1, :]
    vocab = shift_logits.size(-1)
    log_p = torch.log_softmax(shift_logits.float(), dim=-1)
    kl = -math.log(vocab) - log_p.mean(-1)
    return _token_mean(kl, mask, num_tokens)


def kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """KL(teacher || student) per position, averaged over the positions where ``mask`` is true
    (divided by ``num_tokens`` when given; see ``_token_mean``).

    Both logits are ``[B, T, V]`` and ``mask`` is ``[B, T]`` over the same positions (callers pass
    the shifted label mask). No T^2 rescaling: the loss weight already sets the scale.
    """
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return _token_mean(kl, mask, num_tokens)


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


# -- open-unlearning's RMU, UNDIAL, WGA, SatImp and CE-U ---------------------------------------


def representation_loss(hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """RMU's activation distance (Li et al., 2024, "The WMDP Benchmark"): the squared error per
    position averaged over the hidden dimension, averaged over each sequence's ``mask``-ed positions,
    then over the batch.

    ``hidden`` is ``[B, T, D]``; ``target`` broadcasts to it (``[D]`` for the steering vector, or
    ``[B, T, D]`` for the frozen model's activations); ``mask`` is ``[B, T]`` (not shifted: the
    hidden state *at* a token is scored). This is open-unlearning's reduction (per-sequence mean, then
    batch mean); a sequence without scored positions adds 0 where theirs gives NaN. A mean over
    sequences, so it needs no ``num_tokens``: every DDP rank has as many rows.
    """
    squared = (hidden.float() - target.float()).pow(2).mean(-1)
    mask = mask.to(squared.dtype)
    return ((squared * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def _label_index(shift_labels: Tensor) -> tuple[Tensor, Tensor]:
    # The label ids as a gather/scatter index (``[B, T-1, 1]``; ignored positions point at token 0
    # and are masked out by the caller) and the mask of scored positions.
    mask = shift_labels != IGNORE_INDEX
    return shift_labels.clamp_min(0).unsqueeze(-1), mask


def _soft_cross_entropy(
    logits: Tensor, target_probs: Tensor, mask: Tensor, num_tokens: Tensor | float | None = None
) -> Tensor:
    # -sum_v q_v log p_v per position, averaged over the positions where ``mask`` is true.
    vocab = logits.size(-1)
    ce = F.cross_entropy(logits.reshape(-1, vocab), target_probs.reshape(-1, vocab), reduction="none").view(
        mask.shape
    )
    return _token_mean(ce, mask, num_tokens)


def undial_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    beta: float,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """UNDIAL (Dong et al., 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
    Unlearning in LLMs"): cross-entropy of the student against softmax(teacher logits - beta on the
    label token), per label position, averaged over the label tokens of the batch (divided by
    ``num_tokens`` when given; see ``_token_mean``).

    Open-unlearning averages over *every* position (prompt and padding too, where its index -100
    wraps round to vocabulary id V-100); we score only the label tokens, as every other loss here.
    """
    shift_logits, shift_labels = _shift(logits, labels)
    index, mask = _label_index(shift_labels)
    teacher = teacher_logits[:, :-1, :].detach().float()
    adjusted = teacher.scatter_add(-1, index, torch.full(index.shape, -float(beta), device=teacher.device))
    return _soft_cross_entropy(shift_logits.float(), torch.softmax(adjusted, dim=-1), mask, num_tokens)


def wga_loss(logits: Tensor, labels: Tensor, beta: float, num_tokens: Tensor | float | None = None) -> Tensor:
    """Weighted gradient ascent (Wang et al., 2025, "Rethinking LLM Unlearning Objectives: A Gradient
    Perspective and Go Beyond"): -mean over label tokens of p_t^beta * NLL_t, the weight detached,
    so tokens the model has already forgotten (small p_t) stop pulling. Open-unlearning's form: the
    weighted sum over a token *count* (``num_tokens`` when given; see ``_token_mean``)."""
    logp, mask = token_logprobs(logits, labels)
    weight = (logp.detach() * beta).exp()
    return _token_mean(weight * logp, mask, num_tokens)


def satimp_loss(
    logits: Tensor, labels: Tensor, beta1: float, beta2: float, num_tokens: Tensor | float | None = None
) -> Tensor:
    """SatImp (Yang et al., 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
    Unlearning"): -mean over label tokens of p_t^beta1 * (1 - p_t)^beta2 * NLL_t, the weights
    detached (saturation times importance). Open-unlearning's form: the weighted sum over a token
    *count* (``num_tokens`` when given; see ``_token_mean``)."""
    logp, mask = token_logprobs(logits, labels)
    logp_d = logp.detach()
    weight = (logp_d * beta1).exp() * (-torch.expm1(logp_d)).clamp_min(0).pow(beta2)
    return _token_mean(weight * logp, mask, num_tokens)


def ce_u_loss(logits: Tensor, labels: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """CE-U (Yang et al., 2025, "CE-U: Cross Entropy Unlearning"): cross-entropy of the model
    against the detached softmax of its own logits with the label token's logit set to -inf,
    averaged over the label tokens of the batch (divided by ``num_tokens`` when given; see
    ``_token_mean``). Its gradient on the logits is p - q: the label token's logit is pushed down
    by p_t, which vanishes once forgotten (no runaway, unlike GA)."""
    shift_logits, shift_labels = _shift(logits, labels)
    index, mask = _label_index(shift_labels)
    logits32 = shift_logits.float()
    target = torch.softmax(logits32.detach().scatter(-1, index, float("-inf")), dim=-1)
    return _soft_cross_entropy(logits32, target, mask, num_tokens)


def drop_first_label_tokens(labels: Tensor, n: int) -> Tensor:
    """``labels`` with the first ``n`` label tokens of each row set to -100 (CE-U's
    ``ignore_first_n_answer_tokens``, from a footnote of its paper's training settings)."""
    scored = labels != IGNORE_INDEX
    return labels.masked_fill(scored & (scored.cumsum(-1) <= n), IGNORE_INDEX)
