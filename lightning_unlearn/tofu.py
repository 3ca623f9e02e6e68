"""The TOFU benchmark (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"): its
data roles, metrics and prompt format in one place. Scoring is the ``Evaluator``'s
(``evaluation.py``); the protocol that trains the target, the retain model and every objective is
``protocol.py``.

- Data roles (hub id ``locuslab/TOFU``, ``data/tofu.py``; the synthetic world has the same
  layout): ``forget`` (train ``forget01``/``05``/``10``, scored ``forget10_perturbed`` and the
  like), ``retain`` (train ``retain99``/``95``/``90``, scored ``retain_perturbed``), ``holdout``
  (``holdout01``/``05``/``10``: authors no model saw, for the MIA metrics that need no retain
  model), ``real_authors`` (``real_authors_perturbed``) and ``world_facts``
  (``world_facts_perturbed``): general knowledge that unlearning should keep.
- Metrics (open-unlearning's names and definitions, ``metrics/tofu.py``,
  ``metrics/memorisation.py``): ``forget_quality`` (a KS test of the forget truth ratios against
  the retain model's), ``model_utility`` (harmonic mean over the retain, real-author and
  world-fact scores), per role ``<role>_Q_A_Prob``, ``<role>_Q_A_ROUGE`` and truth ratio, the
  memorisation scores and, with a holdout, the MIA AUCs and ``privleak``: ``METRICS``, in the
  order the protocol's table shows them.
- Prompt format: ``Question: ...\\nAnswer: `` (``data/formatting.PromptFormat``, plain), or the
  tokenizer's chat template; a model is scored in the format it was trained in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lightning_unlearn.data.formatting import PLAIN, PromptFormat
from lightning_unlearn.data.tofu import TOFU_HUB_ID
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.report import Report

NAME = "tofu"
HUB_ID = TOFU_HUB_ID
DEFAULT_FORMAT = PLAIN  # the data modules' default
METRICS = (
    "forget_quality",
    "forget_quality_holdout",
    "model_utility",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_truth_ratio",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "forget_exact_memorization",
    "forget_extraction_strength",
    "mia_min_k",
    "mia_gap",
    "privleak",
)
# Role -> the hub split scored for it (open-unlearning's forget10 evaluation).
EVAL_SPLITS = {
    "forget": "forget10_perturbed",
    "retain": "retain_perturbed",
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
}


def evaluate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, list[dict]],
    settings: EvaluationSettings | None = None,
    prompt_format: PromptFormat | None = None,
    max_length: int = 512,
    retain_truth_ratios: Sequence[float] | str | Path | None = None,
    retain_mia_auc: float | None = None,
    progress: bool = True,
) -> Report:
    """The ``Evaluator``'s report of ``model`` on ``splits`` (role -> records), run with
    ``settings`` and questions encoded as the model was trained to read them; the retain model's
    forget truth ratios (or its report) give ``forget_quality``, its min-k AUC ``privleak``."""
    evaluator = (settings or EvaluationSettings()).evaluator(
        tokenizer,
        splits,
        prompt_format=prompt_format or DEFAULT_FORMAT,
        max_length=max_length,
        retain_truth_ratios=retain_truth_ratios,
        retain_mia_auc=retain_mia_auc,
        progress=progress,
    )
    report = evaluator.run(model)
    report.settings["benchmark"] = NAME
    return report
