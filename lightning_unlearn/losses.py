"""Every unlearning loss as a pure function of tensors.

Conventions: logits are ``[B, T, V]``, labels ``[B, T]`` with -100 on tokens that are not scored,
and position t's logits predict label t+1. Logits may be a tensor or a lazy ``Logits`` source
(``lightning_unlearn.logits``): every loss reads them only at the positions it scores, through
``Logits.values``, so a source built from hidden states never materialises the rest. Every
reduction is a mean over the batch so that DDP's gradient averaging yields the global mean: a
mean over sequences as it is (every rank has as many rows), a mean over tokens through
``num_tokens`` (the mean token count per rank, see ``_token_mean``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_unlearn.logits import Logits, as_logits

IGNORE_INDEX = -100


def next_labels(labels: Tensor) -> Tensor:
    """The label each logits position predicts, ``[B, T]``: labels shifted left, the last
    position (which predicts nothing) -100."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _unshift(mask: Tensor) -> Tensor:
    # A ``[B, T-1]`` mask over shifted positions as a ``[B, T]`` mask over logits positions.
    return F.pad(mask, (0, 1), value=False)


# -- functions of logit rows [n, V]: each loss's per-position value, for ``Logits.values`` --------


def _float(rows: Tensor) -> Tensor:
    # Half precision is upcast to float32; float64 stays (the influence tests use exact solves).
    return rows.to(torch.promote_types(rows.dtype, torch.float32))


def row_logprob(rows: Tensor, targets: Tensor) -> Tensor:
    """log p(target) of each row, through the fused cross-entropy kernel (no materialised
    log-softmax, which matters at a 50k vocabulary)."""
    return -F.cross_entropy(_float(rows), targets, reduction="none")


def row_uniform_kl(rows: Tensor) -> Tensor:
    """KL(U || p) of each row: -log V - mean_v log p_v = logsumexp(z) - mean(z) - log V."""
    rows = _float(rows)
    return torch.logsumexp(rows, -1) - rows.mean(-1) - math.log(rows.size(-1))


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


def token_logprobs(logits: Tensor | Logits, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each label token, ``(logp [B, T-1], mask [B, T-1])``; 0 where masked.

    Half-precision logits are upcast to float32; float64 stays float64."""
    targets = next_labels(labels)
    positions = targets != IGNORE_INDEX
    logp = as_logits(logits).values(positions, row_logprob, targets)
    return logp[:, :-1], positions[:, :-1]


def sequence_logprob(logits: Tensor | Logits, labels: Tensor) -> Tensor:
    """Sum of label-token log-probabilities per sequence, ``[B]`` (no length normalisation)."""
    logp, mask = token_logprobs(logits, labels)
    return (logp * mask).sum(-1)


def mean_token_nll(logits: Tensor | Logits, labels: Tensor) -> Tensor:
    """Per-sequence mean NLL over its label tokens, ``[B]`` (the quantity behind Prob and SimNPO)."""
    logp, mask = token_logprobs(logits, labels)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def nll_loss(logits: Tensor | Logits, labels: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
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
    logits: Tensor | Logits,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    positions: str = "answer",
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """KL(U || p) per position, averaged over the chosen positions (closer-look's ME objective).

    KL(U || p) = -log V - (1/V) sum_v log p_v, computed as logsumexp(z) - mean(z) - log V.
    ``positions="answer"`` scores the positions that predict label tokens; ``"sequence"`` every
    position that predicts a real (non-padding) token, as closer-look's TOFU runs did.
    ``num_tokens``: the denominator (default: the number of those positions; see ``_token_mean``).
    """
    mask = max_entropy_positions(labels, attention_mask, positions)
    kl = as_logits(logits).values(_unshift(mask), row_uniform_kl)[:, :-1]
    return _token_mean(kl, mask, num_tokens)


def kl_divergence(
    student_logits: Tensor | Logits,
    teacher_logits: Tensor | Logits,
    mask: Tensor,
    temperature: float = 1.0,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """KL(teacher || student) per position, averaged over the positions where ``mask`` is true
    (divided by ``num_tokens`` when given; see ``_token_mean``).

    Both logits are ``[B, T, V]`` and ``mask`` is ``[B, T]`` over the same positions (callers
    scoring labels pass ``label_mask`` padded with a last False column, see ``reference_kl``).
    The teacher is a fixed target (detached). No T^2 rescaling: the loss weight sets the scale.
    """

    def row_kl(student: Tensor, teacher: Tensor) -> Tensor:
        log_s = torch.log_softmax(_float(student) / temperature, dim=-1)
        log_t = torch.log_softmax(_float(teacher) / temperature, dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum(-1)

    kl = as_logits(student_logits).values(mask, row_kl, teacher=as_logits(teacher_logits))
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


def _soft_cross_entropy(rows: Tensor, target_probs: Tensor) -> Tensor:
    # -sum_v q_v log p_v per row.
    return F.cross_entropy(_float(rows), target_probs, reduction="none")


def undial_loss(
    logits: Tensor | Logits,
    teacher_logits: Tensor | Logits,
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
    targets = next_labels(labels)
    positions = targets != IGNORE_INDEX

    def row_undial(student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        adjusted = _float(teacher).scatter_add(
            -1, target[:, None], torch.full((target.shape[0], 1), -float(beta), device=teacher.device)
        )
        return _soft_cross_entropy(student, torch.softmax(adjusted, dim=-1))

    ce = as_logits(logits).values(positions, row_undial, targets, teacher=as_logits(teacher_logits))
    return _token_mean(ce[:, :-1], positions[:, :-1], num_tokens)


def wga_loss(
    logits: Tensor | Logits, labels: Tensor, beta: float, num_tokens: Tensor | float | None = None
) -> Tensor:
    """Weighted gradient ascent (Wang et al., 2025, "Rethinking LLM Unlearning Objectives: A Gradient
    Perspective and Go Beyond"): -mean over label tokens of p_t^beta * NLL_t, the weight detached,
    so tokens the model has already forgotten (small p_t) stop pulling. Open-unlearning's form: the
    weighted sum over a token *count* (``num_tokens`` when given; see ``_token_mean``)."""
    logp, mask = token_logprobs(logits, labels)
    weight = (logp.detach() * beta).exp()
    return _token_mean(weight * logp, mask, num_tokens)


def satimp_loss(
    logits: Tensor | Logits,
    labels: Tensor,
    beta1: float,
    beta2: float,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """SatImp (Yang et al., 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
    Unlearning"): -mean over label tokens of p_t^beta1 * (1 - p_t)^beta2 * NLL_t, the weights
    detached (saturation times importance). Open-unlearning's form: the weighted sum over a token
    *count* (``num_tokens`` when given; see ``_token_mean``)."""
    logp, mask = token_logprobs(logits, labels)
    logp_d = logp.detach()
    weight = (logp_d * beta1).exp() * (-torch.expm1(logp_d)).clamp_min(0).pow(beta2)
    return _token_mean(weight * logp, mask, num_tokens)


def ce_u_loss(logits: Tensor | Logits, labels: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """CE-U (Yang et al., 2025, "CE-U: Cross Entropy Unlearning"): cross-entropy of the model
    against the detached softmax of its own logits with the label token's logit set to -inf,
    averaged over the label tokens of the batch (divided by ``num_tokens`` when given; see
    ``_token_mean``). Its gradient on the logits is p - q: the label token's logit is pushed down
    by p_t, which vanishes once forgotten (no runaway, unlike GA)."""
    targets = next_labels(labels)
    positions = targets != IGNORE_INDEX

    def row_ce_u(rows: Tensor, target: Tensor) -> Tensor:
        rows = _float(rows)
        removed = torch.softmax(rows.detach().scatter(-1, target[:, None], float("-inf")), dim=-1)
        return _soft_cross_entropy(rows, removed)

    ce = as_logits(logits).values(positions, row_ce_u, targets)
    return _token_mean(ce[:, :-1], positions[:, :-1], num_tokens)


def drop_first_label_tokens(labels: Tensor, n: int) -> Tensor:
    """``labels`` with the first ``n`` label tokens of each row set to -100 (CE-U's
    ``ignore_first_n_answer_tokens``, from a footnote of its paper's training settings)."""
    scored = labels != IGNORE_INDEX
    return labels.masked_fill(scored & (scored.cumsum(-1) <= n), IGNORE_INDEX)
