"""MUSE's metrics (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language
Models"; definitions from their code, https://github.com/swj0419/muse_bench, ``metrics/verbmem.py``,
``metrics/knowmem.py``, ``metrics/privleak.py``, ``metrics/logger.py``, ``eval.py``).

- VerbMem: each prompt (with the tokenizer's special tokens) is continued greedily for
  ``max_new_tokens`` (128); the reference is the ground truth's first ``max_new_tokens`` token ids
  (special tokens included, as MUSE cuts them) decoded without special tokens; the score is the
  mean ROUGE-L F1 (rouge-score, no stemmer), times 100.
- KnowMem: a few-shot prompt ``Question: {q}\\nAnswer: {a}\\n\\n`` per in-context example, then
  ``Question: {q}\\nAnswer: ``; greedy for ``max_new_tokens`` (32); the answer is cut before the
  first ``\\n\\n``, ``\\nQuestion`` or ``Question:``; mean ROUGE-L F1 against the gold answer, x100.
- PrivLeak: Min-K% Prob (k = 0.4) of each privleak text, every token after the first scored;
  the AUC of telling forget texts from holdout texts, in MUSE's orientation (0 when every forget
  text is more likely than every holdout text, about 0.5 for a model that never saw either);
  PrivLeak = (AUC - AUC_retrain) / AUC_retrain x 100: about 0 for the retrained model, strongly
  negative for a model that still remembers the forget set, positive for over-unlearning.

Generation is greedy decoding as in Hugging Face ``generate`` (``metrics/greedy.py``), batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer
from transformers import GenerationConfig

from lightning_unlearn.data.collate import pad_batch
from lightning_unlearn.metrics.greedy import greedy_decode, plain_greedy
from lightning_unlearn.metrics.memorisation import mia_auc, mia_min_k

ICL_TEMPLATE = "Question: {question}\nAnswer: {answer}\n\n"
QUESTION_TEMPLATE = "Question: {question}\nAnswer: "
STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")
MIN_K = 0.4

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@dataclass
class KnowMemFormat:
    """KnowMem's few-shot prompt and where an answer is cut (MUSE's ``metrics/knowmem.py``)."""

    icl_template: str = ICL_TEMPLATE
    question_template: str = QUESTION_TEMPLATE
    stop_strings: tuple[str, ...] = STOP_STRINGS

    def prompt(self, question: str, icl: Sequence[dict[str, str]]) -> str:
        shots = "".join(self.icl_template.format(question=x["question"], answer=x["answer"]) for x in icl)
        return shots + self.question_template.format(question=question)

    def cut(self, output: str) -> str:
        """``output`` before the first stop string."""
        for stop in self.stop_strings:
            output = output.split(stop)[0]
        return output


def rouge_l_f1(generated: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each generation against its reference (rouge-score, no stemmer, as MUSE)."""
    return [_ROUGE.score(ref, gen)["rougeL"].fmeasure for gen, ref in zip(generated, references, strict=True)]


@torch.no_grad()
def greedy_texts(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Each prompt's greedy continuation (prompt encoded with special tokens), decoded without
    special tokens; batches of similar lengths, longest first; ``generate`` when the model's
    generation config changes greedy decoding."""
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    texts = [""] * len(ids)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [ids[i] for i in chunk]
        if plain_greedy(model):
            tokens = greedy_decode(model, rows, eos, pad, max_new_tokens)
        else:
            batch = pad_batch([{"input_ids": r} for r in rows], pad, side="left")
            config = GenerationConfig(
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos
            )
            out = model.generate(**{k: v.to(device) for k, v in batch.items()}, generation_config=config)
            tokens = out[:, batch["input_ids"].shape[1] :].tolist()
        decoded = tokenizer.batch_decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        for i, text in zip(chunk, decoded, strict=True):
            texts[i] = text
    return texts


def verbmem(
    model, tokenizer, rows: Sequence[dict[str, str]], max_new_tokens: int = 128, batch_size: int = 16
) -> tuple[float, list[dict]]:
    """VerbMem (x100) and per row ``{"prompt", "gt", "response", "rougeL"}``."""
    outputs = greedy_texts(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    references = [
        tokenizer.decode(
            tokenizer(r["gt"])["input_ids"][:max_new_tokens],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=True,
        )
        for r in rows
    ]
    scores = rouge_l_f1(outputs, references)
    log = [
        {"prompt": r["prompt"], "gt": ref, "response": out, "rougeL": s}
        for r, ref, out, s in zip(rows, references, outputs, scores, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores), log


def knowmem(
    model,
    tokenizer,
    rows: Sequence[dict[str, str]],
    icl: Sequence[dict[str, str]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    knowmem_format: KnowMemFormat | None = None,
) -> tuple[float, list[dict]]:
    """KnowMem (x100) and per question ``{"question", "gt", "response", "rougeL"}``."""
    fmt = knowmem_format or KnowMemFormat()
    prompts = [fmt.prompt(r["question"], icl) for r in rows]
    outputs = [fmt.cut(o) for o in greedy_texts(model, tokenizer, prompts, max_new_tokens, batch_size)]
    scores = rouge_l_f1(outputs, [r["answer"] for r in rows])
    log = [
        {"question": r["question"], "gt": r["answer"], "response": out, "rougeL": s}
        for r, out, s in zip(rows, outputs, scores, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores), log


@torch.no_grad()
def min_k_scores(
    model, tokenizer, texts: Sequence[str], k: float = MIN_K, max_length: int = 2048, batch_size: int = 8
) -> list[float]:
    """Min-K% Prob of each text (MUSE's ``privleak.py``): minus the mean of the lowest
    floor(n k) log-probabilities of its n tokens after the first (at least one); loss-like, lower
    means more likely trained on. Texts are encoded with special tokens and cut at ``max_length``."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        rows = [list(tokenizer(t)["input_ids"])[:max_length] for t in texts[start : start + batch_size]]
        batch = pad_batch([{"input_ids": r, "labels": r} for r in rows], tokenizer.pad_token_id, side="right")
        batch = {k_: v.to(device) for k_, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores += mia_min_k(logits.float(), batch["labels"], k=k, drop_last=False).tolist()
    return scores


def muse_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MUSE's AUC of loss-like scores (forget labelled 0, holdout 1, ranked by minus the score):
    the probability that a holdout text looks more like training data than a forget text, ties
    half. ``memorisation.mia_auc`` is open-unlearning's orientation, one minus this."""
    return 1.0 - mia_auc(forget_scores, holdout_scores)


def privleak(auc: float, auc_retrain: float) -> float:
    """PrivLeak (MUSE ``eval.py``) in percent from MUSE-orientation AUCs:
    (auc - auc_retrain) / auc_retrain x 100."""
    if auc_retrain <= 0:
        raise ValueError(f"the retrained model's AUC must be positive, got {auc_retrain}")
    return (auc - auc_retrain) / auc_retrain * 100.0
