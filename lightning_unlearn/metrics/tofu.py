"""TOFU's core metrics as pure functions of per-sample NLLs and texts.

Names and definitions follow open-unlearning so tables compare. Inputs are per-answer mean token
NLLs (``avgNLL``): a correct answer ``[N]`` and K alternatives ``[N, K]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp
from torch import Tensor


def answer_probability(mean_nll: Tensor) -> Tensor:
    """Prob per sample: exp(-mean NLL over the answer's label tokens, EOS included)."""
    return torch.exp(-mean_nll)


def truth_ratio(correct_nll: Tensor, perturbed_nll: Tensor) -> Tensor:
    """TR = exp(-mean_j avgNLL(perturbed_j)) / exp(-avgNLL(correct)), per sample.

    ``correct`` is the paraphrased answer for TOFU authors and the answer itself for real authors
    and world facts. TR < 1 means the model prefers the correct answer.
    """
    return torch.exp(correct_nll - perturbed_nll.mean(-1))


def prob_normalised(correct_nll: Tensor, perturbed_nll: Tensor) -> Tensor:
    """c / (c + sum_j w_j) with length-normalised probabilities c = exp(-avgNLL) of each answer."""
    correct = torch.exp(-correct_nll)
    return correct / (correct + torch.exp(-perturbed_nll).sum(-1))


def forget_truth_ratio(tr: Tensor) -> float:
    """Mean of min(TR, 1/TR): 1 when the model cannot tell correct from perturbed."""
    return torch.minimum(tr, 1.0 / tr).mean().item()


def truth_ratio_score(tr: Tensor) -> float:
    """Mean of max(0, 1 - TR): high when the model prefers the correct answer (retain, ra, wf)."""
    return torch.clamp(1.0 - tr, min=0.0).mean().item()


def forget_quality(tr_model: Sequence[float], tr_retain: Sequence[float]) -> float:
    """KS-test p-value between the model's and the retain model's raw per-sample forget TRs."""
    return float(ks_2samp(list(tr_model), list(tr_retain)).pvalue)


def forget_quality_holdout(forget_values: Sequence[float], holdout_values: Sequence[float]) -> float:
    """KS-test p-value between ONE model's per-question statistic on the forget questions and on
    the holdout questions (authors it was never trained on): forget_quality without a retain model.

    A model that never saw the forget authors should treat them as it treats authors it never
    saw, so after ideal unlearning the two samples come from one distribution and the p-value is
    high; a model that still remembers the forget authors (or has been pushed below never-seen
    authors, over-unlearning) gives a low one. The same two-sample KS test as ``forget_quality``
    (Maini et al., 2024, TOFU), so the two read alike; the samples may differ in size.
    """
    forget, holdout = [float(v) for v in forget_values], [float(v) for v in holdout_values]
    if not forget or not holdout:
        raise ValueError("forget_quality_holdout needs at least one forget and one holdout value")
    return float(ks_2samp(forget, holdout).pvalue)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(generated: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference (rouge_score, Porter stemmer)."""
    return [_ROUGE.score(ref, gen)["rougeL"].recall for gen, ref in zip(generated, references, strict=True)]


MODEL_UTILITY_COMPONENTS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)


def model_utility(metrics: dict[str, float]) -> tuple[float, list[str]]:
    """Harmonic mean of the model-utility components present in ``metrics``, and their names.

    With every split evaluated these are open-unlearning's nine; a missing split (e.g. the
    synthetic world has no real authors) drops its three, and the names used are returned.
    """
    return harmonic_mean_of(metrics, MODEL_UTILITY_COMPONENTS)


def harmonic_mean_of(metrics: dict[str, float], components: Sequence[str]) -> tuple[float, list[str]]:
    """Harmonic mean of the ``components`` present in ``metrics`` and their names: NaN with none
    present, 0 when any is 0 or below (scipy's ``hmean`` limit)."""
    names = [name for name in components if name in metrics]
    if not names:
        return math.nan, []
    values = [metrics[name] for name in names]
    if min(values) <= 0:
        return 0.0, names
    return float(hmean(values)), names
