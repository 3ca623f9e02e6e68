"""Closer-look's aggregates (Yuan et al., 2024, "A Closer Look at Machine Unlearning for LLMs").

Model Utility (MU) and Forget Efficacy (FE) over per-split metric means, as ``get_eval_results`` in
sail-sg/closer-look-LLM-unlearning ``metrics/metrics.py`` computes them from six metrics per split
(ROUGE-L recall, Probability, Truth Ratio, Token Entropy, Cosine Similarity, Entailment Score):

- MU = harmonic mean of all six on every non-forget split (retain, real authors, world facts: 18).
- FE = 1 - arithmetic mean of the forget split's five without Token Entropy.

Their Probability is the answer's Prob on forget / retain and the normalised c / (c + sum_j w_j) on
real authors / world facts, which are this project's ``*_Q_A_Prob`` and ``*_Q_A_Prob_normalised``.
Their Truth Ratio is ``mean max(0, 1 - TR)`` off the forget split (our ``*_Truth_Ratio``) and
``1 - mean min(TR, 1/TR)`` on it, i.e. ``1 - forget_truth_ratio``. Components absent from the
metrics dict (a split not evaluated, no generation) are skipped and the names used are returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_unlearn.metrics.tofu import harmonic_mean_of

_PROB = {"forget": "Q_A_Prob", "retain": "Q_A_Prob", "ra": "Q_A_Prob_normalised", "wf": "Q_A_Prob_normalised"}


def _mu_components(prefix: str) -> tuple[str, ...]:
    return (
        f"{prefix}_{_PROB[prefix]}",
        f"{prefix}_Q_A_ROUGE",
        f"{prefix}_Truth_Ratio",
        f"{prefix}_token_entropy",
        f"{prefix}_cosine_similarity",
        f"{prefix}_entailment_score",
    )


CLOSER_LOOK_MU_COMPONENTS = tuple(
    name for prefix in ("retain", "ra", "wf") for name in _mu_components(prefix)
)
CLOSER_LOOK_FE_COMPONENTS = (
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_truth_ratio",
    "forget_cosine_similarity",
    "forget_entailment_score",
)


def closer_look_mu(
    metrics: dict[str, float], prefixes: Sequence[str] = ("retain", "ra", "wf")
) -> tuple[float, list[str]]:
    """Closer-look's Model Utility: harmonic mean of the six metrics on each split in ``prefixes``.

    ``prefixes=("retain",)`` gives their "Model Utility Retain". Returns ``(value, names used)``;
    NaN with no component present, 0 when any component is 0 (scipy's ``hmean`` limit).
    """
    return harmonic_mean_of(metrics, [name for prefix in prefixes for name in _mu_components(prefix)])


def closer_look_fe(metrics: dict[str, float]) -> tuple[float, list[str]]:
    """Closer-look's Forget Efficacy: 1 - mean of the forget split's Prob, ROUGE, truth-ratio term
    ``1 - forget_truth_ratio``, cosine similarity and entailment score (token entropy excluded).

    Higher = more forgotten. Returns ``(value, names used)``; NaN with no component present.
    """
    names = [name for name in CLOSER_LOOK_FE_COMPONENTS if name in metrics]
    if not names:
        return math.nan, []
    values = [1.0 - metrics[name] if name == "forget_truth_ratio" else metrics[name] for name in names]
    return 1.0 - sum(values) / len(values), names
