"""The figures unlearning papers show: forget quality against model utility over training, and
the distributions of the forget truth ratios of the fine-tuned, retain and unlearned models."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

from lightning_unlearn.io import _umask

matplotlib.use("Agg")  # files only: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Write the figure atomically: a PNG is either whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def truth_ratio_cdfs(
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    forget_quality: Mapping[str, float] | None = None,
    reference: str = "retain",
) -> Path:
    """Empirical CDFs of each model's per-sample forget truth ratios (log10), the ``reference``
    (retain) model's drawn thick and black: forget_quality is the KS test between a model's curve
    and that one (the p-value of their largest vertical gap), so the figure shows what the number
    tests. Each label carries the model's forget_quality when given."""
    from scipy.stats import ecdf

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, trs in series.items():
        logs = [math.log10(v) for v in trs if v > 0]
        if not logs:
            continue
        cdf = ecdf(logs).cdf
        fq = (forget_quality or {}).get(name)
        label = name if fq is None else f"{name} (forget quality {fq:.3g})"
        style = {"color": "black", "linewidth": 2.5, "zorder": 3} if name == reference else {"linewidth": 1.2}
        ax.step(cdf.quantiles, cdf.probabilities, where="post", label=label, **style)
    ax.set_xlabel("log10 truth ratio (forget set)")
    ax.set_ylabel("fraction of questions <= x")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _save(fig, path)


def forget_quality_vs_utility(
    trajectories: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    retain_utility: float | None = None,
) -> Path:
    """One line per objective through its (model_utility, forget_quality) evaluations over training,
    the first point an open square (where the run started), the last a dot; forget quality on a log axis as in TOFU's figures. The retain model (the
    goal: forget quality 1 at its utility) is a star when its utility is given."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if retain_utility is not None:
        ax.plot(retain_utility, 1.0, marker="*", markersize=12, color="black", linestyle="", label="retain")
    for name, points in trajectories.items():
        pts = [(p["model_utility"], p["forget_quality"]) for p in points if "forget_quality" in p]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        (line,) = ax.plot(xs, ys, marker=".", label=name)
        ax.plot(xs[0], ys[0], marker="s", fillstyle="none", color=line.get_color())  # where it started
        ax.plot(xs[-1], ys[-1], marker="o", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def continual_forgetting(runs: Mapping[str, Sequence[Mapping]], path: str | Path) -> Path:
    """Continual unlearning, one panel per sequential run: each request's forget quality after every
    step from the step it was requested (log axis), and model utility on a second axis."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, (name, ledger) in zip(axes[0], runs.items(), strict=True):
        done = [entry for entry in ledger if entry.get("status") == "done"]
        steps = range(1, len(done) + 1)
        for k, request in enumerate(entry["name"] for entry in done):
            key = f"eval/forget_quality/{request}"
            pts = [(s, e["metrics"][key]) for s, e in zip(steps, done, strict=True) if key in e["metrics"]]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs, ys, marker="o", label=f"FQ {request}", color=plt.cm.viridis(k / max(1, len(done)))
                )
        ax.set_yscale("log")
        ax.set_xlabel("requests unlearned")
        ax.set_ylabel("forget quality (KS p-value)")
        ax.set_title(name)
        utility = [(s, e["metrics"]["eval/model_utility"]) for s, e in zip(steps, done, strict=True)
                   if "eval/model_utility" in e["metrics"]]  # fmt: skip
        if utility:
            twin = ax.twinx()
            xs, ys = zip(*utility, strict=True)
            twin.plot(xs, ys, color="black", linestyle="--", marker="s", label="model utility")
            twin.set_ylabel("model utility")
            twin.legend(fontsize=7, loc="lower right")
        ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def sweep_pareto(
    trials: Mapping[str, Sequence[tuple[float, float]]],
    front: Sequence[tuple[float, float]],
    path: str | Path,
    best: tuple[float, float] | None = None,
    retain_utility: float | None = None,
    min_utility: float | None = None,
) -> Path:
    """A sweep's evaluations as (model_utility, forget_quality) points, one colour per trial, the
    Pareto front joined and ringed, the chosen evaluation a red ring, the retain model (the goal:
    forget quality 1 at its utility) a star, the rule's lowest allowed utility a dashed line;
    forget quality on a log axis as in TOFU's figures."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if min_utility is not None:
        ax.axvline(min_utility, color="grey", linestyle="--", linewidth=0.8, label="rule's utility floor")
    for k, (name, points) in enumerate(trials.items()):
        if points:
            xs, ys = zip(*points, strict=True)
            color = plt.cm.viridis(k / max(1, len(trials) - 1))
            ax.plot(xs, ys, marker=".", linestyle="", color=color, label=name)
    if front:
        xs, ys = zip(*sorted(front), strict=True)
        ax.plot(
            xs, ys, color="black", linewidth=0.8, marker="o", markerfacecolor="none", label="Pareto front"
        )
    if best is not None:
        ax.plot(
            *best, marker="o", markersize=13, markerfacecolor="none", color="red", linestyle="", label="best"
        )
    if retain_utility is not None:
        ax.plot(retain_utility, 1.0, marker="*", markersize=12, color="black", linestyle="", label="retain")
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value)")
    ax.legend(fontsize=7, ncol=2 if len(trials) > 8 else 1, loc="best")
    return _save(fig, path)
