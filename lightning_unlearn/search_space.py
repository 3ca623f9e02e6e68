"""A sweep's search space: dotted keys into one protocol objective entry (``max_epochs``,
``objective.init_args.beta``, ``objective.init_args.optimizer.init_args.lr``, ``trainer.
gradient_clip_val``), each a list of values (a grid axis, or a categorical choice for TPE) or a
range ``{low, high, log, step}`` (TPE only), sampled through Optuna's ``suggest_*``."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

from lightning_unlearn.errors import UserError

Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``values`` (a list), or ``low``/``high`` with optional ``log``/``step``;
    a range is integer when both ends are integers."""

    key: str
    values: tuple[Scalar, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def examples(self) -> list[Scalar]:
        """Values that stand for the whole dimension when checking that its key is a setting."""
        return list(self.values) if self.values is not None else [self.low, self.high]

    def suggest(self, trial) -> Scalar:
        """The trial's value through Optuna (an enqueued trial gets its fixed value back)."""
        if self.values is not None:
            return trial.suggest_categorical(self.key, list(self.values))
        if self.is_int:
            step = int(self.step or 1)
            return trial.suggest_int(self.key, self.low, self.high, step=step, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


def parse_space(space: dict[str, Any], where: str) -> list[Dimension]:
    """``space`` from a sweep config as dimensions; ``where`` (the config file) starts every error."""
    if not space:
        raise UserError(f"{where}: space is empty: give at least one key with its values")
    dims = []
    for key, spec in space.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise UserError(f"{where}: space key {key!r} is not a dotted path like objective.init_args.beta")
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{where}: space key '{key}' has an empty list of values")
            bad = [v for v in spec if not isinstance(v, (str, int, float, bool, type(None)))]
            if bad:
                raise UserError(
                    f"{where}: space key '{key}': values must be numbers, strings or booleans, got {bad[0]!r}"
                )
            if len({repr(v) for v in spec}) != len(spec):
                raise UserError(f"{where}: space key '{key}' lists a value twice: {spec}")
            dims.append(Dimension(key, values=tuple(spec)))
            continue
        if (
            not isinstance(spec, dict)
            or not {"low", "high"} <= set(spec)
            or set(spec) - {"low", "high", "log", "step"}
        ):
            raise UserError(
                f"{where}: space key '{key}' needs a list of values or {{low, high, log, step}}, got {spec!r}"
            )
        low, high = spec["low"], spec["high"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or low >= high or (spec.get("log") and low <= 0):
            raise UserError(
                f"{where}: space key '{key}' needs numbers low < high (low > 0 with log), got {spec!r}"
            )
        if spec.get("log") and spec.get("step") is not None:
            raise UserError(f"{where}: space key '{key}': Optuna takes step or log, not both")
        dims.append(Dimension(key, low=low, high=high, log=bool(spec.get("log")), step=spec.get("step")))
    return dims


def grid(dims: list[Dimension], where: str) -> list[dict[str, Scalar]]:
    """Every combination of the dimensions' values, the last key varying fastest."""
    ranges = [d.key for d in dims if d.values is None]
    if ranges:
        raise UserError(
            f"{where}: a grid sweep needs a list of values for space key '{ranges[0]}', not a range"
        )
    return [
        dict(zip([d.key for d in dims], combo, strict=True))
        for combo in itertools.product(*(d.values for d in dims))
    ]


def apply(entry: dict[str, Any], settings: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of the objective entry with each dotted key set (missing levels are created)."""
    entry = copy.deepcopy(entry)
    for key, value in settings.items():
        node = entry
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                held = ".".join(parts[: depth + 1])
                raise UserError(f"{where}: space key '{key}': '{held}' is {child!r}, not a group of settings")
            node = child
        node[parts[-1]] = value
    return entry


def without(entry: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """A copy of the objective entry without the dotted ``keys``: what a sweep's trials depend on
    besides its space (each trial sets those keys, so the entry's own values never matter)."""
    entry = copy.deepcopy(entry)
    for key in keys:
        node, parts = entry, key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return entry
