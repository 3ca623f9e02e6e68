"""Benchmarks by name: what ``lightning-unlearn protocol`` and ``evaluate`` build for a config's
``benchmark:`` key (or ``--benchmark``), ``tofu`` when none is given.

Each benchmark is three things: its module (data roles, ``NAME``, ``METRICS``,
``DEFAULT_FORMAT`` and ``evaluate(model, tokenizer, ...) -> Report``), the runner a ``protocol``
config builds (train the benchmark's models, score them, write the report) and the command class
``evaluate`` builds to score one saved model. Adding a benchmark adds one line here.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

from lightning_unlearn import muse, tofu, wmdp
from lightning_unlearn.errors import UserError
from lightning_unlearn.evaluate import EvaluateCommand, MuseEvaluateCommand, WmdpEvaluateCommand
from lightning_unlearn.muse_run import MuseRun
from lightning_unlearn.protocol import Protocol
from lightning_unlearn.wmdp_run import WmdpRun

# The config key (and command-line option) that names a benchmark.
KEY = "benchmark"
DEFAULT = tofu.NAME


class Benchmark(NamedTuple):
    module: ModuleType
    runner: type
    evaluate: type


BENCHMARKS: dict[str, Benchmark] = {
    tofu.NAME: Benchmark(tofu, Protocol, EvaluateCommand),
    muse.NAME: Benchmark(muse, MuseRun, MuseEvaluateCommand),
    wmdp.NAME: Benchmark(wmdp, WmdpRun, WmdpEvaluateCommand),
}


def benchmark(name: object, where: str) -> Benchmark:
    """The benchmark called ``name``; ``where`` (a config file, or ``command line``) names the
    place of the ``benchmark`` key in the error for an unknown one."""
    if not isinstance(name, str) or name not in BENCHMARKS:
        raise UserError(f"{where}: {KEY}: unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]
