"""The MUSE benchmark (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language
Models", https://github.com/swj0419/muse_bench): its data roles, metrics and prompt format in one place.

- Data roles (``data/muse.py``; hub ids ``muse-bench/MUSE-News`` and ``muse-bench/MUSE-Books``):
  ``forget`` documents to unlearn (``raw``/``forget``), ``retain`` documents that regularised
  objectives keep (``raw``/``retain1``), and the scored sets: ``verbmem``/``forget`` (prompt and
  continuation), ``knowmem`` ``forget_qa`` and ``retain_qa`` with their in-context examples
  (``*_icl``), ``privleak`` ``forget`` and ``holdout`` texts.
- Metrics (``metrics/muse.py``, all in percent as MUSE reports them): ``forget_verbmem``,
  ``forget_knowmem``, ``retain_knowmem``, ``privleak_auc`` (MUSE's orientation) and, given the
  retrained model's AUC, ``privleak``.
- Prompt format: KnowMem's few-shot ``Question: ...\\nAnswer: ...`` (``metrics/muse.KnowMemFormat``);
  VerbMem continues the raw excerpt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_unlearn.data.muse import NEWS_HUB_ID, load_documents, load_knowmem, load_verbmem
from lightning_unlearn.errors import UserError
from lightning_unlearn.metrics import muse as metrics
from lightning_unlearn.metrics.muse import KnowMemFormat
from lightning_unlearn.report import Report

NAME = "muse"
DEFAULT_FORMAT = KnowMemFormat()
METRICS = ("forget_verbmem", "forget_knowmem", "retain_knowmem", "privleak")
# MUSE's published AUC of its retrained models (forget vs holdout, Min-40%; constants.py), for a
# run that scores against MUSE's retrained model without training its own.
RETRAIN_AUC = {"news": 0.4772, "books": 0.5393}


def check_retrain_auc(retrain_auc: float | None) -> None:
    """A retrained model's PrivLeak AUC is a probability above 0 (PrivLeak divides by it)."""
    if retrain_auc is not None and not 0 < retrain_auc <= 1:
        raise UserError(f"retrain_auc must be in (0, 1], got {retrain_auc}")


@dataclass
class MuseSets:
    """The scored sets, loaded: VerbMem rows, KnowMem questions and their in-context examples,
    PrivLeak texts."""

    verbmem: list[dict[str, str]]
    forget_qa: list[dict[str, str]]
    forget_icl: list[dict[str, str]]
    retain_qa: list[dict[str, str]]
    retain_icl: list[dict[str, str]]
    privleak_forget: list[str]
    privleak_holdout: list[str]


@dataclass
class MuseSource:
    """Where the scored sets come from: a hub id (``muse-bench/MUSE-News`` / ``MUSE-Books``) or a
    local copy in its layout; ``retain_qa`` names the retain KnowMem split (``retain_qa``; early
    MUSE-Books revisions call it ``retain2_qa``); the first ``limit`` rows of each set."""

    source: str = NEWS_HUB_ID
    retain_qa: str = "retain_qa"
    limit: int | None = None

    def load(self) -> MuseSets:
        src, n = self.source, self.limit
        return MuseSets(
            verbmem=load_verbmem(src, "forget", n),
            forget_qa=load_knowmem(src, "forget_qa", n),
            forget_icl=load_knowmem(src, "forget_qa_icl"),
            retain_qa=load_knowmem(src, self.retain_qa, n),
            retain_icl=load_knowmem(src, f"{self.retain_qa}_icl"),
            privleak_forget=load_documents(src, "privleak", "forget", n),
            privleak_holdout=load_documents(src, "privleak", "holdout", n),
        )


@dataclass
class MuseSettings:
    """Generation lengths (MUSE's defaults: 128 VerbMem, 32 KnowMem tokens), Min-K%'s k (0.4),
    the longest PrivLeak text in tokens, and batch sizes."""

    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32
    min_k: float = metrics.MIN_K
    max_length: int = 2048
    generation_batch_size: int = 16
    batch_size: int = 8
    knowmem_format: KnowMemFormat = field(default_factory=KnowMemFormat)

    def __post_init__(self) -> None:
        for name in ("verbmem_max_new_tokens", "knowmem_max_new_tokens", "max_length",
                     "generation_batch_size", "batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UserError(f"evaluation.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.min_k <= 1:
            raise UserError(f"evaluation.min_k must be in (0, 1], got {self.min_k}")


def evaluate(
    model, tokenizer, sets: MuseSets, settings: MuseSettings | None = None, retrain_auc: float | None = None
) -> Report:
    """The four MUSE numbers of one model (``privleak`` only with ``retrain_auc``), with every
    generation and per-sample score."""
    s = settings or MuseSettings()
    gen = {"batch_size": s.generation_batch_size}
    verb, verb_log = metrics.verbmem(model, tokenizer, sets.verbmem, s.verbmem_max_new_tokens, **gen)
    fmt = s.knowmem_format
    know_f, know_f_log = metrics.knowmem(
        model, tokenizer, sets.forget_qa, sets.forget_icl, s.knowmem_max_new_tokens, knowmem_format=fmt, **gen
    )
    know_r, know_r_log = metrics.knowmem(
        model, tokenizer, sets.retain_qa, sets.retain_icl, s.knowmem_max_new_tokens, knowmem_format=fmt, **gen
    )
    score = {"k": s.min_k, "max_length": s.max_length, "batch_size": s.batch_size}
    forget = metrics.min_k_scores(model, tokenizer, sets.privleak_forget, **score)
    holdout = metrics.min_k_scores(model, tokenizer, sets.privleak_holdout, **score)
    auc = metrics.muse_auc(forget, holdout)
    values = {"forget_verbmem": verb, "forget_knowmem": know_f, "retain_knowmem": know_r, "privleak_auc": auc}
    if retrain_auc is not None:
        values["privleak"] = metrics.privleak(auc, retrain_auc)
    return Report(
        metrics=values,
        per_sample={
            "forget_verbmem": [r["rougeL"] for r in verb_log],
            "forget_knowmem": [r["rougeL"] for r in know_f_log],
            "retain_knowmem": [r["rougeL"] for r in know_r_log],
            "privleak_forget_min_k": forget,
            "privleak_holdout_min_k": holdout,
        },
        generations={"verbmem_forget": verb_log, "knowmem_forget": know_f_log, "knowmem_retain": know_r_log},
        settings={"benchmark": NAME, "retrain_auc": retrain_auc},
    )
