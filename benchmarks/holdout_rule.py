"""How well the retain-model-free monitors agree with TOFU's forget_quality over a protocol run.

    python benchmarks/holdout_rule.py runs/smollm2_tofu [runs/smollm2_npo ...] [--min-utility-ratio 0.9] [--json out.json]

Reads a protocol run's ``history.json`` (every evaluation during training of every objective that
had ``eval_every_n_epochs``) and the target's report, or a sweep's ``sweep.json`` (every finished
trial's evaluations, each trial a run of its own); several directories of one target pool theirs. Over every evaluation it gives the Spearman rank
correlation of each monitor with the true forget_quality (which needs a retain model), and per
objective which evaluation each rule would stop at, with the true forget_quality there against the
best true forget_quality of that run. Rules: the highest monitor value (``forget_quality_holdout``)
or the lowest (``mia_gap``) among evaluations whose model_utility is at least
``min-utility-ratio`` x the target's; "oracle" is the same rule on forget_quality itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

MONITORS = {"forget_quality_holdout": max, "mia_gap": min}  # monitor -> which end is best


def eligible(history: list[dict], min_utility: float) -> list[dict]:
    """The evaluations a deployment may stop at: utility kept, and the metrics present."""
    return [e for e in history if e.get("model_utility", 0.0) >= min_utility and "forget_quality" in e]


def pick(history: list[dict], key: str, best=max) -> dict | None:
    """The evaluation a rule stops at: the best ``key``; ties go to the earliest (fewer steps)."""
    scored = [e for e in history if key in e]
    if not scored:
        return None
    target = best(e[key] for e in scored)
    return next(e for e in scored if e[key] == target)


def agreement(histories: dict[str, list[dict]], target_utility: float, ratio: float) -> dict:
    """Rank correlations over every evaluation and, per objective, the checkpoint each rule picks."""
    every = [e for h in histories.values() for e in h if "forget_quality" in e]
    result: dict = {"evaluations": len(every), "spearman": {}, "objectives": {}}
    for monitor in MONITORS:
        pairs = [(e[monitor], e["forget_quality"]) for e in every if monitor in e]
        if len(pairs) >= 3:
            rho = spearmanr(*zip(*pairs, strict=True)).statistic
            result["spearman"][monitor] = float(rho)
    for name, history in histories.items():
        candidates = eligible(history, ratio * target_utility)
        oracle = pick(candidates, "forget_quality")
        row = {"eligible": len(candidates), "best_forget_quality": oracle and oracle["forget_quality"]}
        for monitor, best in MONITORS.items():
            chosen = pick(candidates, monitor, best)
            row[monitor] = chosen and {
                "step": chosen["step"],
                "forget_quality": chosen["forget_quality"],
                "model_utility": chosen["model_utility"],
            }
        result["objectives"][name] = row
    return result


def load_histories(run_dir: Path) -> dict[str, list[dict]]:
    """Run name -> its evaluations: a protocol's objectives, or a sweep's finished trials."""
    sweep = run_dir / "sweep.json"
    if not sweep.is_file():
        return json.loads((run_dir / "history.json").read_text())
    summary = json.loads(sweep.read_text())
    return {
        f"{summary['name']}/{t['name']}": t["evaluations"]
        for t in summary["trials"]
        if t["state"] == "COMPLETE"
    }


def table(result: dict) -> str:
    lines = [
        "| objective | eligible evaluations | best forget_quality | picked by forget_quality_holdout | picked by mia_gap |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["objectives"].items():
        cells = []
        for monitor in MONITORS:
            c = row[monitor]
            cells.append("—" if c is None else f"{c['forget_quality']:.4f} (step {c['step']})")
        best = row["best_forget_quality"]
        lines.append(
            f"| {name} | {row['eligible']} | {'—' if best is None else f'{best:.4f}'} | {' | '.join(cells)} |"
        )
    rhos = ", ".join(f"{m} {r:+.2f}" for m, r in result["spearman"].items())
    lines.append(
        f"\nSpearman rank correlation with forget_quality over {result['evaluations']} evaluations: {rhos}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--min-utility-ratio", type=float, default=0.9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    histories: dict[str, list[dict]] = {}
    for run_dir in args.run_dirs:
        histories |= load_histories(run_dir)
    target = json.loads((args.run_dirs[0] / "reports" / "finetuned" / "report.json").read_text())
    result = agreement(histories, target["metrics"]["model_utility"], args.min_utility_ratio)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
