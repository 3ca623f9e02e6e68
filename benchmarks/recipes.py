"""What each objective reaches on a benchmark, from its sweep: the README's recipe table.

    python benchmarks/recipes.py runs/smollm2_me_gd runs/smollm2_npo ... [--ratio 0.95] [--md out.md]

Each argument is a finished (or partly finished) ``lightning-unlearn sweep`` directory. Per sweep,
over every evaluation of every finished trial after step 0:

- ``rule``: the highest forget_quality among evaluations keeping ``ratio`` x the target's
  model_utility (the sweeps' own rule, so it names the model ``best/`` holds);
- ``any``: the highest forget_quality at any utility, so an objective that only forgets by
  losing utility says how far it got and what it cost, rather than leaving an empty row.

Wall time is the trial's, to the end of its fit with every evaluation (the chosen step's share of
training alone is less). The target and the retain model are the first two rows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLUMNS = ["forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "privleak"]


def evaluations(summary: dict) -> list[tuple[dict, dict]]:
    """(trial, evaluation) for every evaluation after the start of every finished trial."""
    return [
        (trial, e)
        for trial in summary["trials"]
        if trial["state"] == "COMPLETE"
        for e in trial["evaluations"][1:]
        if _number(e.get("forget_quality")) and _number(e.get("model_utility"))
    ]


def best(candidates: list[tuple[dict, dict]]) -> tuple[dict, dict] | None:
    """Highest forget_quality; a tie to the higher model_utility (as the sweeps' rule breaks it),
    then to the earlier trial and step (fewer updates)."""
    top = None
    for trial, e in candidates:
        if top is None or (e["forget_quality"], e["model_utility"]) > (
            top[1]["forget_quality"],
            top[1]["model_utility"],
        ):
            top = (trial, e)
    return top


def rows(summary: dict, ratio: float) -> dict[str, tuple[dict, dict] | None]:
    """The rule's pick and the any-utility pick of one sweep."""
    floor = ratio * summary["target"]["model_utility"]
    every = evaluations(summary)
    return {"rule": best([(t, e) for t, e in every if e["model_utility"] >= floor]), "any": best(every)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cells(metrics: dict, target_utility: float) -> list[str]:
    out = []
    for key in COLUMNS:
        v = metrics.get(key)
        out.append("—" if not _number(v) else f"{v:.1f}" if key == "privleak" else f"{v:.4f}")
        if key == "model_utility":
            out.append("—" if not _number(v) else f"{v / target_utility:.2f}x")
    return out


def table(summaries: list[dict], ratio: float) -> str:
    target, retain = summaries[0]["target"], summaries[0]["retain"]
    mu = target["model_utility"]
    head = ["model", "pick", "settings", "step", "forget_quality", "model_utility", "ratio",
            "forget Prob", "forget ROUGE", "privleak", "trial wall s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, metrics in (("target", target), ("retain", retain)):
        lines.append("| " + " | ".join([name, "", "", "", *_cells(metrics, mu), ""]) + " |")
    for summary in summaries:
        for pick, chosen in rows(summary, ratio).items():
            label = f"{pick} (>= {ratio}x)" if pick == "rule" else pick
            if chosen is None:
                cells = [summary["objective"], label, "no evaluation", *[""] * (len(head) - 3)]
                lines.append("| " + " | ".join(cells) + " |")
                continue
            trial, e = chosen
            settings = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:g}" for k, v in trial["settings"].items())
            cells = [summary["objective"], label, settings, str(e["step"]), *_cells(e, mu)]
            lines.append("| " + " | ".join([*cells, f"{trial['wall_time_s']:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweeps", type=Path, nargs="+")
    parser.add_argument("--ratio", type=float, default=0.95)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    summaries = [
        json.loads((d / "sweep.json").read_text()) for d in args.sweeps if (d / "sweep.json").is_file()
    ]
    if not summaries:
        raise SystemExit("recipes.py: none of the directories holds a sweep.json yet")
    text = table(summaries, args.ratio)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
