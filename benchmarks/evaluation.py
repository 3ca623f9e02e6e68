"""Evaluator wall time against a naive loop, side by side in one run: TOFU forget01 + retain, SmolLM2-135M.

    python benchmarks/evaluation.py [--retain-limit 40] [--batch-size 16] [--max-new-tokens 64] [--no-bf16]

The Evaluator scores every answer variant of a batch of questions in one forward and generates in
left-padded batches that stop at EOS. The naive arm is the loop one writes first: one unpadded
forward per answer variant (mean NLL from Hugging Face's ``labels=`` loss) and one unbatched
``generate`` per question. Both arms run on the same model, records, prompt format and generation
budget, one after the other, each after a warm-up forward. A speedup only counts if both arms
compute the same numbers, so their per-sample truth ratios, Probs and generations are compared too.
(The Evaluator also computes the forget split's memorisation and MIA scores; the naive arm does not.)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lightning_unlearn.data.formatting import PromptFormat, encode, encode_prompt
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.evaluation import Evaluator
from lightning_unlearn.metrics.tofu import (
    answer_probability,
    forget_truth_ratio,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)
from lightning_unlearn.models import ModelSpec, load_model, load_spec_tokenizer
from lightning_unlearn.report import Report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ROOT, smollm2_gguf  # noqa: E402  (a sibling script, not a package)

MAX_LENGTH = 512  # the Evaluator's default, used by both arms
T = TypeVar("T")
TR_KEY = {"forget": "forget_truth_ratio", "retain": "retain_Truth_Ratio"}


def precision(bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (the precision runs evaluate under) or plain fp32; the same for both arms."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def naive(
    model,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, list[dict]],
    fmt: PromptFormat,
    max_new_tokens: int,
) -> tuple[dict[str, list], dict[str, list[str]], int, int]:
    """Per-sample TR, Prob and ROUGE (keyed as in the Report), generations, forwards, generate calls."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    per_sample: dict[str, list] = {}
    generations: dict[str, list[str]] = {}
    forwards = generates = 0
    for role, records in splits.items():
        nll = []
        for r in records:
            row = []
            for answer in [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]:
                enc = encode(r["question"], answer, tokenizer, fmt, MAX_LENGTH)
                out = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]]))
                row.append(out.loss.item())
                forwards += 1
            nll.append(row)
        texts = []
        for r in records:
            ids = torch.tensor([encode_prompt(r["question"], tokenizer, fmt, MAX_LENGTH)])
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
            texts.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).strip())
            generates += 1
        scores = torch.tensor(nll)  # [N, 2 + K]: answer, paraphrase, K perturbed
        per_sample[TR_KEY[role]] = truth_ratio(scores[:, 1], scores[:, 2:]).tolist()
        per_sample[f"{role}_Q_A_Prob"] = answer_probability(scores[:, 0]).tolist()
        per_sample[f"{role}_Q_A_ROUGE"] = rouge_l_recall(texts, [r["answer"] for r in records])
        generations[role] = texts
    return per_sample, generations, forwards, generates


def aggregate(per_sample: dict[str, list]) -> dict[str, float]:
    """The Report's split-level numbers from per-sample values, as the Evaluator aggregates them."""
    metrics = {k: sum(v) / len(v) for k, v in per_sample.items() if k not in TR_KEY.values()}
    metrics["forget_truth_ratio"] = forget_truth_ratio(torch.tensor(per_sample["forget_truth_ratio"]))
    metrics["retain_Truth_Ratio"] = truth_ratio_score(torch.tensor(per_sample["retain_Truth_Ratio"]))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--forget-split", default="forget01_perturbed")
    parser.add_argument("--limit", type=int, default=None, help="first N forget rows (default: all)")
    parser.add_argument("--retain-limit", type=int, default=40, help="first N rows of retain_perturbed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"))
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    args = parser.parse_args()

    splits = {
        "forget": load_split(args.tofu, args.forget_split)[: args.limit],
        "retain": load_split(args.tofu, "retain_perturbed")[: args.retain_limit],
    }
    spec = ModelSpec(path=smollm2_gguf(), dtype="float32")
    tokenizer = load_spec_tokenizer(spec)
    model = load_model(spec, tokenizer).eval()
    fmt = PromptFormat()
    warm = torch.tensor([encode_prompt(splits["forget"][0]["question"], tokenizer, fmt, MAX_LENGTH)])

    def timed(arm: Callable[[], T]) -> tuple[T, float]:
        """``arm()``'s result and wall seconds, after a warm-up forward, in the chosen precision."""
        with precision(args.bf16), torch.no_grad():
            model(input_ids=warm)  # warm-up, so neither arm pays for first-call allocations
            start = time.perf_counter()
            result = arm()
            return result, time.perf_counter() - start

    def ours() -> Report:
        """The Evaluator, constructed inside the timing: validating the records is part of its cost."""
        return Evaluator(
            tokenizer, splits, fmt, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            max_length=MAX_LENGTH, progress=False,
        ).run(model)  # fmt: skip

    report, ours_s = timed(ours)
    (per_sample, generations, naive_forwards, naive_generates), naive_s = timed(
        lambda: naive(model, tokenizer, splits, fmt, args.max_new_tokens)
    )

    batches = sum(math.ceil(len(r) / args.batch_size) for r in splits.values())
    sizes = ", ".join(f"{role} {len(records)}" for role, records in splits.items())
    print(
        f"TOFU {args.forget_split} + retain_perturbed ({sizes} questions) on SmolLM2-135M (CPU), "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, batch {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, {torch.get_num_threads()} threads"
    )
    print("| arm | forward passes | generate calls | seconds | vs naive |")
    print("|---|---|---|---|---|")
    print(f"| ours (Evaluator) | {batches} | {batches} | {ours_s:.1f} | {naive_s / ours_s:.2f}x |")
    print(f"| naive | {naive_forwards} | {naive_generates} | {naive_s:.1f} | 1.00x |")

    print("\nAgreement (ours vs naive):")
    for key, values in per_sample.items():
        diff = max(abs(a - b) for a, b in zip(report.per_sample[key], values, strict=True))
        print(f"- {key}: max |diff| per sample {diff:.2e}")
    for role, texts in generations.items():
        ours_texts = [g["generated"] for g in report.generations[role]]
        differing = sum(a != b for a, b in zip(ours_texts, texts, strict=True))
        print(f"- {role} generations: {differing} of {len(texts)} differ")
    print("\n| metric | ours | naive |")
    print("|---|---|---|")
    for key, value in aggregate(per_sample).items():
        print(f"| {key} | {report.metrics[key]:.4f} | {value:.4f} |")


if __name__ == "__main__":
    main()
