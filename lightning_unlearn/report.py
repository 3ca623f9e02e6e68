"""Report: the result of one evaluation, saved as report.json and a report.md table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning_unlearn.errors import UserError
from lightning_unlearn.io import write_text_atomic


@dataclass
class Report:
    """``metrics`` name -> float; ``per_sample`` name -> list; ``generations`` split -> list of dicts."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    generations: dict[str, list[dict]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        return cls(**{k: data.get(k, {}) for k in ("metrics", "per_sample", "generations", "settings")})

    @classmethod
    def load(cls, path: str | Path) -> Report:
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(f"report '{path}' does not exist") from None
        except json.JSONDecodeError as err:
            raise UserError(f"report '{path}' is not valid JSON ({err.msg} at line {err.lineno})") from None

    def save(self, directory: str | Path) -> Path:
        """Write ``report.json`` and ``report.md`` into ``directory``, each atomically."""
        directory = Path(directory)
        write_text_atomic(directory / "report.json", json.dumps(self.to_dict(), indent=1) + "\n")
        write_text_atomic(directory / "report.md", metrics_table({"model": self.metrics}) + "\n")
        return directory


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.2e}"
    return f"{value:.4f}"


def metrics_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None) -> str:
    """A Markdown table, one row per model, one column per metric (union of all, first-seen order)."""
    if columns is None:
        columns = []
        for metrics in rows.values():
            columns += [name for name in metrics if name not in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def continual_table(name: str, ledger: list[dict], before: dict[str, float] | None = None) -> str:
    """One sequential run as a Markdown table: a row per completed request (step), a column per
    request's forget quality (``-`` before it is requested), then model utility; ``before`` (the
    same ``eval/...`` keys, every request) is the model before the first request. Falls back to
    each request's forget truth ratio when no retain model was known."""
    done = [entry for entry in ledger if entry.get("status") == "done"]
    requests = [entry["name"] for entry in done]
    kind = "forget_quality"
    if done and not any(k.startswith("eval/forget_quality/") for k in done[-1].get("metrics", {})):
        kind = "forget_truth_ratio"
    rows = {}
    if before is not None:
        row = {f"{kind} {r}": before.get(f"eval/{kind}/{r}") for r in requests}
        rows["before (0)"] = {**row, "model_utility": before.get("eval/model_utility")}
    for step, entry in enumerate(done, start=1):
        metrics = entry.get("metrics", {})
        row = {f"{kind} {r}": metrics.get(f"eval/{kind}/{r}") for r in requests}
        row["model_utility"] = metrics.get("eval/model_utility")
        rows[f"after {entry['name']} ({step})"] = row
    return f"### {name}\n\n" + metrics_table(rows)
