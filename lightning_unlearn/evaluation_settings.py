"""EvaluationSettings: how the evaluation suite runs, in one place for every way of starting it.

The ``evaluate`` command, the ``UnlearningEvaluation`` callback, the protocol's ``evaluation:``
section and the benchmarks all evaluate with the same knobs; each used to spell out the whole
``Evaluator`` construction itself, so a new knob reached some of them and not others. They now
hold (or are) an ``EvaluationSettings`` and build their Evaluator with ``evaluator``.

The encoding (``prompt_format``, ``max_length``) is not a field: it is how the model was trained
to read its input, so the protocol takes it from its ``data:`` section (evaluating in another
format than the one trained in would measure the format, not the forgetting), and the command and
the callback have their own keys for it. ``evaluator`` takes it as an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from transformers import PreTrainedTokenizerBase

from lightning_unlearn.data.datamodule import check_at_least
from lightning_unlearn.data.formatting import PromptFormat
from lightning_unlearn.evaluation import Evaluator


@dataclass
class EvaluationSettings:
    """What every evaluation of a model is run with.

    Args:
        batch_size: questions per scoring forward, each with all of its answer variants (answer,
            paraphrase, perturbed answers): the memory-for-speed trade of the scoring passes.
        max_new_tokens: greedy generation budget per question, for ROUGE and the generation
            metrics; 0 scores only (no generation metrics), the cheap setting for a sweep.
        generation_batch_size: prompts decoded together; None: as many as the Evaluator's
            key/value cache budget holds. Set it to bound the decode's memory on a GPU.
        fast: prefix-packed scoring and decoding in which finished answers drop out; False runs
            the straightforward passes the fast ones are tested against (slower, same numbers).
        cosine_model: sentence-transformers model (name or local path) for closer-look's cosine
            similarity; None skips the metric.
        nli_model: NLI classifier (name or local path) for closer-look's entailment score; None
            skips it.
    """

    # The config section these keys live in, for error messages (a subclass names its own).
    section: ClassVar[str] = "evaluation"

    batch_size: int = 16
    max_new_tokens: int = 200
    generation_batch_size: int | None = None
    fast: bool = True
    cosine_model: str | None = None
    nli_model: str | None = None

    def __post_init__(self) -> None:
        check_at_least(
            1, self.section, batch_size=self.batch_size, generation_batch_size=self.generation_batch_size
        )
        check_at_least(0, self.section, max_new_tokens=self.max_new_tokens)

    def evaluator(
        self,
        tokenizer: PreTrainedTokenizerBase,
        splits: dict[str, list[dict]],
        *,
        prompt_format: PromptFormat,
        max_length: int,
        retain_truth_ratios: Sequence[float] | str | Path | None = None,
        retain_mia_auc: float | None = None,
        progress: bool = True,
    ) -> Evaluator:
        """The Evaluator of these settings over ``splits`` (role -> records), encoding questions
        as the model was trained to read them (``prompt_format``, ``max_length``). The retain
        model's references (its per-sample forget truth ratios or its report, and its min-k MIA
        AUC) give ``forget_quality`` and ``privleak``; they belong to the run, not the settings."""
        return Evaluator(
            tokenizer,
            splits,
            prompt_format,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            retain_truth_ratios=retain_truth_ratios,
            max_length=max_length,
            progress=progress,
            retain_mia_auc=retain_mia_auc,
            cosine_model=self.cosine_model,
            nli_model=self.nli_model,
            generation_batch_size=self.generation_batch_size,
            fast=self.fast,
        )
