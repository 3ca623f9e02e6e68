"""The WMDP benchmark (Li et al., 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use
With Unlearning"): its data roles, metrics and prompt format in one place.

- Data roles: ``forget`` corpora (``cais/wmdp-corpora``: ``bio-forget-corpus``, gated, and
  ``cyber-forget-corpus``), a ``retain`` corpus (wikitext in the paper's RMU), and the question
  sets scored, by name: ``wmdp`` (``cais/wmdp``, ``wmdp-bio`` / ``wmdp-cyber`` / ``wmdp-chem``)
  for what should be forgotten, ``mmlu`` (``cais/mmlu``) for what should stay.
- Metrics: ``<name>_accuracy`` per question set (zero-shot, lm-eval's ``acc``; ``METRICS`` names
  those of the default sets, ``wmdp`` and ``mmlu``), ``mmlu`` also per subject, and per question
  the chosen index in the report's per-sample values (``<name>_prediction``).
- Prompt format: lm-eval's multiple-choice template (``metrics/multiple_choice.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_unlearn.data.multiple_choice import MMLU_HUB_ID, WMDP_HUB_ID, load_questions
from lightning_unlearn.errors import UserError
from lightning_unlearn.metrics.multiple_choice import ChoiceFormat, MultipleChoiceScorer
from lightning_unlearn.report import Report

NAME = "wmdp"
DEFAULT_FORMAT = ChoiceFormat()
METRICS = ("wmdp_accuracy", "mmlu_accuracy")


@dataclass
class QuestionSet:
    """One scored question set: a hub id or local copy (``data/multiple_choice.py``), its config,
    split, and the first ``limit`` questions."""

    source: str
    config: str | None = None
    split: str = "test"
    limit: int | None = None

    def load(self) -> list[dict]:
        return load_questions(self.source, self.config, self.split, self.limit)


def default_question_sets() -> dict[str, QuestionSet]:
    """WMDP-bio and all of MMLU, as the paper reports them."""
    return {"wmdp": QuestionSet(WMDP_HUB_ID, "wmdp-bio"), "mmlu": QuestionSet(MMLU_HUB_ID, "all")}


def evaluate(
    model,
    tokenizer,
    questions: dict[str, list[dict]],
    batch_size: int = 16,
    max_length: int = 2048,
    choice_format: ChoiceFormat | None = None,
) -> Report:
    """``<name>_accuracy`` of every question set (``mmlu`` also per subject, ``mmlu_<subject>``),
    with each question's prediction and log-likelihoods as per-sample values."""
    if not questions:
        raise UserError("no question sets to score")
    scorer = MultipleChoiceScorer(tokenizer, choice_format or DEFAULT_FORMAT, batch_size, max_length)
    metrics: dict[str, float] = {}
    per_sample: dict[str, list] = {}
    for name, rows in questions.items():
        scores = scorer.score(model, rows, desc=name)
        metrics[f"{name}_accuracy"] = scores.accuracy
        by_subject = scores.accuracy_by_subject()
        if len(by_subject) > 1:
            metrics.update({f"{name}_{s.replace(' ', '_')}_accuracy": v for s, v in by_subject.items()})
        per_sample[f"{name}_prediction"] = scores.predictions
        per_sample[f"{name}_loglikelihoods"] = scores.loglikelihoods
    return Report(metrics=metrics, per_sample=per_sample, settings={"benchmark": NAME})
