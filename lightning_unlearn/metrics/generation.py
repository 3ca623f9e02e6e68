"""Closer-look's metrics of generated answers: token entropy, cosine similarity, entailment score.

Yuan et al. 2024, "A Closer Look at Machine Unlearning for Large Language Models" (arXiv:2410.08109),
code ``sail-sg/closer-look-LLM-unlearning``, file ``metrics/metrics.py`` (``compute_token_entropy``,
``eval_cosine_similarity``, ``get_entailment_results``, ``get_entailment_score``).

The definitions are theirs; the code is ours. Where we differ (batching, label matching, truncation,
loading errors) each docstring says so. The embedding and NLI models are loaded by name or by local
path; nothing is skipped silently: a model that cannot be loaded raises
:class:`~lightning_unlearn.errors.UserError` naming it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_unlearn.errors import UserError
from lightning_unlearn.metrics.tofu import rouge_l_recall

DEFAULT_EMBEDDING_MODEL = "paraphrase-MiniLM-L6-v2"
DEFAULT_NLI_MODEL = "sileod/deberta-v3-base-tasksource-nli"
ENTAILMENT_LABEL = "entailment"
# Below this ROUGE-L recall a generation counts as factually wrong: never entailed (closer-look).
ROUGE_FLOOR = 0.1
NOT_ENTAILED = "none"  # closer-look's label for a sample forced to not-entailed by the ROUGE floor

Premise = Literal["generated", "reference"]
# Which text closer-look gives the NLI model as the premise (``text``), per TOFU split role; the other
# text is the hypothesis (``text_pair``). On the forget split it asks whether the generation entails
# the ground truth; on the others whether the ground truth entails the generation. (For non-TOFU data,
# their ``tofu=False``, the premise is always the generation.)
CLOSER_LOOK_PREMISE: dict[str, Premise] = {
    "forget": "generated",
    "retain": "reference",
    "real_authors": "reference",
    "world_facts": "reference",
}


def token_entropy(token_ids: Sequence[Hashable], normalize: bool = True) -> float:
    """Closer-look's token entropy of one generated answer (higher = more diverse, less repetitive).

    The Shannon entropy in bits of the answer's unigram token distribution,
    ``H = -sum_t p_t log2 p_t`` with ``p_t`` = count of token t / number of tokens n, divided by its
    maximum ``log2(n)`` (reached when all n tokens differ), so the score lies in [0, 1]. An answer of
    0 or 1 token scores 0 (normalised or not). ``normalize=False`` returns H in bits.

    Source: ``compute_token_entropy`` in ``metrics/metrics.py`` (nltk unigram ``FreqDist``, log base 2,
    ``len(tokens) <= 1 -> 0``). They count the strings of ``tokenizer.tokenize(decoded_text)``; here
    the caller passes the tokens (ids or strings; any hashables). Use :func:`text_token_entropy` to
    re-tokenise the decoded text as they do: generated ids may differ from that re-tokenisation
    (special tokens, EOS, non-canonical splits).
    """
    n = len(token_ids)
    if n <= 1:
        return 0.0
    entropy = -sum((c / n) * math.log2(c / n) for c in Counter(token_ids).values())
    entropy = max(entropy, 0.0)  # a single repeated token gives -0.0
    return entropy / math.log2(n) if normalize else entropy


def text_token_entropy(tokenizer: Any, text: str, normalize: bool = True) -> float:
    """:func:`token_entropy` of ``tokenizer.tokenize(text)`` (no special tokens), as closer-look does."""
    return token_entropy(tokenizer.tokenize(text), normalize=normalize)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path (not a hub id): absolute, ``./``, ``../``, ``~`` or existing."""
    return os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists()


def _check_local(name: str, what: str) -> None:
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise UserError(f"{what} model {name!r} not found: no such local path")


class CosineSimilarity:
    """Closer-look's cosine similarity between a generated and a ground-truth answer.

    Each text is embedded with a sentence-transformers model; a sample scores
    ``max(0, cos(emb(generated), emb(reference)))`` on the raw (unnormalised) embeddings; the split
    score is the mean. ``model`` is a sentence-transformers name or local directory (default
    ``paraphrase-MiniLM-L6-v2`` as in closer-look) or a loaded ``SentenceTransformer``.

    Source: ``eval_cosine_similarity`` in ``metrics/metrics.py`` (``SentenceTransformer.encode`` per
    text, sklearn ``cosine_similarity``, ``max(0, .)``). For TOFU's real-authors / world-facts splits
    they compare with the record's ``original_answer``, elsewhere with its ``answer``; the caller
    chooses the references. We differ only in batching the encoding (``batch_size`` texts at once),
    which changes scores by float rounding (~1e-6) through padding, not otherwise.
    Needs the ``cosine`` extra (``pip install 'lightning-unlearn[cosine]'``).
    """

    def __init__(self, model: Any = DEFAULT_EMBEDDING_MODEL, batch_size: int = 32, device: str | None = None):
        self.batch_size = batch_size
        if isinstance(model, str | os.PathLike):
            model = self.load(str(model), device=device or _default_device())
        self.model = model

    @staticmethod
    def load(name: str, device: str = "cpu") -> Any:
        """A ``SentenceTransformer`` from a name or local path; :class:`UserError` if it cannot load."""
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise UserError(
                "cosine similarity needs sentence-transformers: pip install 'lightning-unlearn[cosine]'"
            ) from err
        _check_local(name, "sentence-embedding")
        try:
            return SentenceTransformer(name, device=device)
        except Exception as err:
            raise UserError(f"cannot load sentence-embedding model {name!r}: {err}") from err

    @torch.no_grad()
    def per_sample(self, generated: Sequence[str], references: Sequence[str]) -> list[float]:
        """Clipped cosine of each generation with its reference."""
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generations but {len(references)} references")
        if not generated:
            return []
        kw = {"batch_size": self.batch_size, "convert_to_tensor": True, "show_progress_bar": False}
        gen = self.model.encode(list(generated), **kw).float()
        ref = self.model.encode(list(references), **kw).float()
        return torch.nn.functional.cosine_similarity(gen, ref, dim=-1).clamp(min=0).tolist()

    def __call__(self, generated: Sequence[str], references: Sequence[str]) -> float:
        """Mean clipped cosine over the samples (NaN for none)."""
        scores = self.per_sample(generated, references)
        return sum(scores) / len(scores) if scores else float("nan")


class EntailmentScore:
    """Closer-look's entailment score: fraction of generations an NLI model labels entailment.

    Each (premise, hypothesis) pair goes through a Hugging Face ``text-classification`` pipeline
    (``model``: a hub name or local directory, default ``sileod/deberta-v3-base-tasksource-nli`` as in
    closer-look, or a loaded pipeline). ``premise="reference"`` feeds (reference, generated),
    ``"generated"`` feeds (generated, reference); closer-look's choice per TOFU split is
    :data:`CLOSER_LOOK_PREMISE` (forget: generated; retain, real authors, world facts: reference).
    A sample whose ROUGE-L recall (generated vs reference, unless ``rouge_recalls`` is given) is below
    0.1 is not entailed whatever the model says. The score is the fraction labelled entailment.

    Source: ``get_entailment_results`` and ``get_entailment_score`` in ``metrics/metrics.py``.
    Differences: labels are matched case-insensitively (``ENTAILMENT`` counts), and a model with no
    entailment label raises :class:`UserError` instead of scoring 0; pairs are truncated to the
    model's maximum length (closer-look does not truncate); batches of ``batch_size`` go through the
    model at once (they send chunks of 30 through a batch-size-1 pipeline), which can only change
    near-ties through padding rounding. Closer-look's ROUGE for real authors / world facts is against
    the record's ``answer`` while the NLI reference is its ``original_answer``: pass ``rouge_recalls``
    to reproduce that.
    """

    def __init__(self, model: Any = DEFAULT_NLI_MODEL, batch_size: int = 30, device: str | None = None):
        self.batch_size = batch_size
        if isinstance(model, str | os.PathLike):
            model = self.load(str(model), device=device or _default_device())
        self.pipe = model
        id2label = getattr(getattr(getattr(model, "model", None), "config", None), "id2label", None) or {}
        if id2label and not any(str(v).lower() == ENTAILMENT_LABEL for v in id2label.values()):
            raise UserError(
                f"NLI model {getattr(model.model, 'name_or_path', model)!r} has no {ENTAILMENT_LABEL!r} "
                f"label (its labels: {sorted(map(str, id2label.values()))})"
            )

    @staticmethod
    def load(name: str, device: str = "cpu") -> Any:
        """A ``text-classification`` pipeline from a name or local path; :class:`UserError` if it cannot."""
        from transformers import pipeline

        _check_local(name, "NLI")
        try:
            return pipeline("text-classification", model=name, device=device)
        except Exception as err:
            raise UserError(f"cannot load NLI model {name!r}: {err}") from err

    def labels(
        self,
        generated: Sequence[str],
        references: Sequence[str],
        premise: Premise = "reference",
        rouge_recalls: Sequence[float] | None = None,
    ) -> list[str]:
        """The NLI label of each sample (lower-cased), or ``"none"`` where ROUGE-L recall < 0.1."""
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generations but {len(references)} references")
        if premise not in ("generated", "reference"):
            raise ValueError(f"premise must be 'generated' or 'reference', not {premise!r}")
        if rouge_recalls is None:
            rouge_recalls = rouge_l_recall(generated, references)
        if len(rouge_recalls) != len(generated):
            raise ValueError(f"{len(rouge_recalls)} ROUGE recalls for {len(generated)} generations")
        todo = [i for i, r in enumerate(rouge_recalls) if r >= ROUGE_FLOOR]
        pairs = [
            {"text": generated[i], "text_pair": references[i]}
            if premise == "generated"
            else {"text": references[i], "text_pair": generated[i]}
            for i in todo
        ]
        out = [NOT_ENTAILED] * len(generated)
        if pairs:
            results = self.pipe(pairs, batch_size=self.batch_size, truncation=True)
            for i, result in zip(todo, results, strict=True):
                out[i] = str(result["label"]).lower()
        return out

    def per_sample(
        self,
        generated: Sequence[str],
        references: Sequence[str],
        premise: Premise = "reference",
        rouge_recalls: Sequence[float] | None = None,
    ) -> list[float]:
        """1.0 where the sample is labelled entailment, else 0.0."""
        labels = self.labels(generated, references, premise, rouge_recalls)
        return [float(label == ENTAILMENT_LABEL) for label in labels]

    def __call__(
        self,
        generated: Sequence[str],
        references: Sequence[str],
        premise: Premise = "reference",
        rouge_recalls: Sequence[float] | None = None,
    ) -> float:
        """Fraction of samples labelled entailment (NaN for none)."""
        scores = self.per_sample(generated, references, premise, rouge_recalls)
        return sum(scores) / len(scores) if scores else float("nan")
