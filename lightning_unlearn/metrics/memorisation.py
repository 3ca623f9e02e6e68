"""Memorisation and membership-inference metrics as pure functions of tensors.

Definitions follow open-unlearning (``src/evals/metrics/memorization.py``, ``src/evals/metrics/mia/``,
``src/evals/metrics/privacy.py``, ``src/evals/metrics/utils.py``) so tables compare.

Conventions: logits are ``[B, T, V]``, labels ``[B, T]`` with -100 on tokens that are not scored, and
position t's logits predict label t+1. Every per-sample function returns ``[B]``.

Token sets, as open-unlearning scores them: exact memorisation, extraction strength, min-k and
min-k++ drop each row's final scored token (``tokenwise_logprobs`` / ``tokenwise_vocab_logprobs``
slice it off as "the EOS prediction"; ``drop_last=False`` keeps it); loss and zlib use every scored
token (``evaluate_probability``). A row with no scored token gets 0 everywhere (open-unlearning
gives EM None, ES 0, min-k/min-k++ 0 and a 0/0 loss); drop such rows before averaging to match its
EM mean exactly.

MIA sign convention (open-unlearning's): every ``mia_*`` score is loss-like, LOWER means "more likely
a member" (trained on). ``mia_auc(members, nonmembers)`` is the probability that a non-member scores
higher than a member (ties half): 1.0 when the forget set is far more likely than the holdout set
(the model still remembers it), about 0.5 at chance.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from lightning_unlearn.losses import IGNORE_INDEX, mean_token_nll, token_logprobs


def _drop_last_scored(mask: Tensor) -> Tensor:
    """``mask`` without each row's last true position (rows with none stay all false)."""
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
    return mask & (positions != last)


def _scored(logits: Tensor, labels: Tensor, drop_last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted ``(logits [B, T-1, V], labels [B, T-1], mask [B, T-1])`` of the scored tokens."""
    shift_logits, shift_labels = logits[:, :-1, :], labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    if drop_last:
        mask = _drop_last_scored(mask)
    return shift_logits, shift_labels, mask


def exact_memorization(logits: Tensor, labels: Tensor, drop_last: bool = True) -> Tensor:
    """Exact memorisation (Tirumala et al., 2022), ``[B]``: the fraction of scored tokens whose
    teacher-forced argmax prediction equals the label (open-unlearning ``memorization.py``)."""
    shift_logits, shift_labels, mask = _scored(logits, labels, drop_last)
    hits = (shift_logits.argmax(-1) == shift_labels) & mask
    return hits.sum(-1).float() / mask.sum(-1).clamp_min(1).float()


def extraction_strength(
    logits: Tensor, labels: Tensor, drop_last: bool = True, match_open_unlearning: bool = True
) -> Tensor:
    """Extraction strength (Carlini et al., 2021; used for unlearning by Wang et al., 2025), ``[B]``.

    ES = 1 - k*/n with n scored tokens and k* the shortest answer prefix from which the model's
    teacher-forced argmax reproduces the whole remaining answer, i.e. ES = L/n where L is the length
    of the trailing run of correctly predicted tokens (open-unlearning ``memorization.py``).
    When even the last token is wrong (L = 0) open-unlearning's loop stops at k = n-1 and reports
    1/n; ``match_open_unlearning=False`` gives the paper's 0 instead.
    """
    shift_logits, shift_labels, mask = _scored(logits, labels, drop_last)
    wrong = mask & (shift_logits.argmax(-1) != shift_labels)
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    last_wrong = torch.where(wrong, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
    n = mask.sum(-1)
    trailing = (mask & (positions > last_wrong)).sum(-1)
    if match_open_unlearning:
        trailing = torch.where(n > 0, trailing.clamp_min(1), trailing)
    return trailing.float() / n.clamp_min(1).float()


def mia_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """LOSS attack (Yeom et al., 2018), ``[B]``: mean NLL over every scored token (EOS included),
    open-unlearning ``mia/loss.py``. Lower = more likely a member."""
    return mean_token_nll(logits, labels) + 0.0  # + 0.0: no -0.0 for empty rows


def mia_zlib(logits: Tensor, labels: Tensor, texts: Sequence[str]) -> Tensor:
    """zlib attack (Carlini et al., 2021), ``[B]``: mean NLL / len(zlib.compress(text as UTF-8)).

    open-unlearning ``mia/zlib.py`` uses the label tokens decoded with special tokens skipped; pass
    that text to match it exactly (the record's answer string is a close stand-in). Lower = member.
    """
    if len(texts) != labels.size(0):
        raise ValueError(f"mia_zlib: {len(texts)} texts for a batch of {labels.size(0)}")
    compressed = torch.tensor(
        [len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float32, device=labels.device
    )
    return mean_token_nll(logits, labels) / compressed


def _min_k_mean(values: Tensor, mask: Tensor, k: float) -> Tensor:
    """Per-row mean of the lowest max(1, floor(n*k)) masked values; 0 for rows with none."""
    n = mask.sum(-1)
    count = torch.minimum(torch.floor(n.double() * k).long().clamp_min(1), n.clamp_min(1))
    sorted_values = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(-1).values
    ranks = torch.arange(values.size(-1), device=values.device).expand_as(values)
    keep = ranks < count.unsqueeze(-1)
    total = torch.where(keep, sorted_values, torch.zeros_like(sorted_values)).sum(-1)
    return torch.where(n > 0, total / count, torch.zeros_like(total))


def mia_min_k(logits: Tensor, labels: Tensor, k: float = 0.4, drop_last: bool = True) -> Tensor:
    """Min-k% Prob (Shi et al., 2024), ``[B]``: minus the mean of the lowest max(1, floor(n*k))
    token log-probs (open-unlearning ``mia/min_k.py``, k = 0.4 in its TOFU config). Lower = member."""
    logp, mask = token_logprobs(logits, labels)
    if drop_last:
        mask = _drop_last_scored(mask)
    return 0.0 - _min_k_mean(logp, mask, k)  # 0.0 - x: no -0.0 for empty rows


def mia_min_k_plus_plus(logits: Tensor, labels: Tensor, k: float = 0.4, drop_last: bool = True) -> Tensor:
    """Min-k%++ (Zhang et al., 2024), ``[B]``: each token log-prob standardised by the mean and std of
    log p under the model's own next-token distribution at that position,
    z_t = (log p(x_t) - E_p[log p]) / sqrt(max(Var_p[log p], 1e-6)), then minus the mean of the lowest
    max(1, floor(n*k)) z_t (open-unlearning ``mia/min_k_plus_plus.py``). Lower = member."""
    shift_logits, shift_labels, mask = _scored(logits, labels, drop_last)
    log_p = torch.log_softmax(shift_logits.float(), dim=-1)
    p = log_p.exp()
    mu = (p * log_p).sum(-1)
    var = ((p * log_p.square()).sum(-1) - mu.square()).clamp_min(1e-6)
    target = log_p.gather(-1, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    z = (target - mu) / var.sqrt()
    return 0.0 - _min_k_mean(z, mask, k)


def mia_auc(member_scores: Tensor | Sequence[float], nonmember_scores: Tensor | Sequence[float]) -> float:
    """ROC AUC of loss-like MIA scores, members (forget) vs non-members (holdout).

    open-unlearning ``mia/utils.py`` labels forget 0 and holdout 1 and feeds the raw scores to
    ``roc_auc_score``, so AUC = P(non-member score > member score) + P(tie)/2: 1.0 when the forget set
    is far more likely than the holdout set. Computed with torchmetrics' ``binary_auroc`` on dense
    ranks scaled to [0, 1] (it would squash raw scores outside [0, 1] through a sigmoid, which ties
    large losses in float precision).
    """
    members = torch.as_tensor(member_scores, dtype=torch.float64).flatten()
    nonmembers = torch.as_tensor(nonmember_scores, dtype=torch.float64).flatten()
    if members.numel() == 0 or nonmembers.numel() == 0:
        raise ValueError("mia_auc needs at least one member and one non-member score")
    scores = torch.cat([members, nonmembers])
    target = torch.cat([torch.zeros_like(members), torch.ones_like(nonmembers)]).long()
    _, ranks = torch.unique(scores, return_inverse=True)
    preds = ranks.double() / max(int(ranks.max()), 1)
    return float(binary_auroc(preds, target))


def privleak(auc_model: float, auc_retain: float) -> float:
    """PrivLeak (MUSE, Shi et al., 2024) in percent, as open-unlearning ``privacy.py`` reports it.

    MUSE's AUC is 1 - open-unlearning's, so with a = 1 - auc_model and r = 1 - auc_retain:
    privleak = (a - r) / (r + 1e-10) * 100. 0 matches the retain model; negative means the forget
    set is still more recognisable than for the retain model (under-unlearning), positive means
    over-unlearning. open-unlearning falls back to auc_retain = 0.5 without retain-model logs.
    """
    a, r = 1.0 - auc_model, 1.0 - auc_retain
    return (a - r) / (r + 1e-10) * 100.0


def mia_gap(auc: float) -> float:
    """|AUC - 0.5|: how far a membership-inference attack is from chance at telling the forget set
    from the holdout set, 0 when it cannot (a stopping monitor to minimise, no retain model needed).

    Both directions count: an AUC above 0.5 means the forget set is still recognisable, below 0.5
    that unlearning pushed it past never-seen data (a signature of over-unlearning, which MUSE's
    PrivLeak also penalises; Shi et al., 2024).
    """
    return abs(auc - 0.5)
