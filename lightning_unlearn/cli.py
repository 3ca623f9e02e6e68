"""Command line: ``lightning-unlearn {fit,validate,test} --config X.yaml`` (LightningCLI),
``lightning-unlearn protocol --config X.yaml`` (a benchmark's whole run from one file: TOFU's
protocol, or the ``benchmark:`` it names), ``evaluate`` (one model on a benchmark) and
``lightning-unlearn sweep --config X.yaml`` (a hyper-parameter search over one of its objectives).

Mistakes a user can fix (``UserError``) print one line and exit with status 2, no traceback.
A preempted command (SIGTERM, SLURM's requeue signal) saves its state, prints one line naming the
command to rerun and exits with status 143 (``preemption``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_unlearn.errors import find_user_error

USAGE = """usage: lightning-unlearn {fit,validate,test,protocol,sweep,evaluate,wmdp,muse} [--config FILE] [--print_config] [--help]

  fit / validate / test   LightningCLI over an UnlearningObjective and a DataModule
  protocol                a benchmark's whole run from one YAML (its benchmark: key, or
                          --benchmark: tofu (default), muse, wmdp); TOFU: fine-tune target and
                          retain models, unlearn with each objective, evaluate all of them and
                          write runs/<name>/report.json
  sweep                   search one protocol objective's settings (grid or Optuna TPE),
                          resumable; runs/<name>/sweep.json, sweep.md, pareto.png, best/
  evaluate                one saved model (or base model + adapter) on a benchmark
                          (--benchmark tofu, muse, wmdp): report.json, report.md in --out_dir
  wmdp                    protocol with benchmark wmdp: unlearn a domain from corpora (RMU),
                          score WMDP and MMLU multiple choice before and after
  muse                    protocol with benchmark muse: unlearn documents (MUSE-News/Books or a
                          generated miniature), score VerbMem, KnowMem and PrivLeak per model
"""


def benchmark_of(argv: list[str], default: str) -> tuple[object, str]:
    """The benchmark a command line names and where (a config file, or ``command line``): the
    last ``--benchmark X`` or ``benchmark:`` key of a ``--config`` file, in the order jsonargparse
    reads them; ``default`` when none. A file that cannot be read is left to the parser to report."""
    import yaml

    name, where = default, "command line"
    for i, arg in enumerate(argv):
        option, has_value, value = arg.partition("=")
        if option not in ("--benchmark", "--config"):
            continue
        if not has_value:
            if i + 1 == len(argv):
                continue
            value = argv[i + 1]
        if option == "--benchmark":
            name, where = value, "command line"
            continue
        try:
            config = yaml.safe_load(Path(value).read_text()) if Path(value).is_file() else None
        except (OSError, yaml.YAMLError):
            config = None
        if isinstance(config, dict) and "benchmark" in config:
            name, where = config["benchmark"], value
    return name, where


def build_protocol(argv: list[str], fixed: str | None = None):
    """The runner a ``protocol`` command line describes, built but not run: its benchmark's
    (``benchmark:``, default ``tofu``: the TOFU ``Protocol``). ``fixed``: the benchmark of the
    ``wmdp`` / ``muse`` commands, which refuse a config of another."""
    from lightning_unlearn import benchmarks
    from lightning_unlearn.errors import UserError

    name, where = benchmark_of(argv, fixed or benchmarks.DEFAULT)
    runner = benchmarks.benchmark(name, where).runner
    if fixed is not None and name != fixed:
        raise UserError(
            f"{where}: benchmark: {name!r}, but `lightning-unlearn {fixed}` runs {fixed}; "
            "run it with `lightning-unlearn protocol`"
        )
    if runner is benchmarks.Protocol:
        from lightning_unlearn.protocol_config import build_protocol as build

        return build(argv)
    return _build_command(runner, argv, fixed or "protocol", f"YAML (see configs/{name}_demo.yaml)")


def build_sweep(argv: list[str]):
    """The ``Sweep`` a ``sweep`` command line describes (its checks done), not yet run."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lightning_unlearn.sweep import Sweep

    parser = ArgumentParser(prog="lightning-unlearn sweep", description=Sweep.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="sweep YAML (see configs/sweeps/demo.yaml)")
    parser.add_class_arguments(Sweep, None, as_group=False, skip={"config_file"})
    init = parser.instantiate(parser.parse_args(argv)).as_dict()
    files = init.pop("config", None) or []
    return Sweep(**init, config_file=str(files[-1]) if files else None)


def protocol_main(argv: list[str]) -> None:
    build_protocol(argv).run()


def sweep_main(argv: list[str]) -> None:
    build_sweep(argv).run()


def _build_command(cls: type, argv: list[str], prog: str, config_help: str):
    """``cls`` built from a command line of its init arguments and ``--config`` YAML files, with
    jsonargparse's checks done; not run."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"lightning-unlearn {prog}", description=cls.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_argument(
        "--benchmark", type=str | None, default=None, help="the benchmark, chosen before this parser"
    )
    parser.add_class_arguments(cls, None, as_group=False)
    init = parser.instantiate(parser.parse_args(argv)).as_dict()
    init.pop("config", None)
    init.pop("benchmark", None)
    return cls(**init)


def build_evaluate(argv: list[str]):
    """The evaluate command of the benchmark an ``evaluate`` command line names (``--benchmark``
    or a ``benchmark:`` key; TOFU's ``EvaluateCommand`` by default), its checks done, not run."""
    from lightning_unlearn import benchmarks

    name, where = benchmark_of(argv, benchmarks.DEFAULT)
    command = benchmarks.benchmark(name, where).evaluate
    return _build_command(command, argv, "evaluate", "YAML with any of the options below")


def evaluate_main(argv: list[str]) -> None:
    command = build_evaluate(argv)
    report = command.run()
    from lightning_unlearn.report import metrics_table

    print(metrics_table({"model": report.metrics}))
    print(f"report: {Path(command.out_dir) / 'report.json'}")


def build_wmdp(argv: list[str]):
    """The ``WmdpRun`` a ``wmdp`` command line describes (``protocol`` with benchmark wmdp), not run."""
    return build_protocol(argv, fixed="wmdp")


def build_muse(argv: list[str]):
    """The ``MuseRun`` a ``muse`` command line describes (``protocol`` with benchmark muse), not run."""
    return build_protocol(argv, fixed="muse")


def lightning_main(argv: list[str] | None, run: bool = True):
    """LightningCLI over every objective and data module; ``run=False`` only builds them (tests)."""
    from lightning_unlearn.objective_cli import ObjectiveCLI, objective_cli_kwargs

    return ObjectiveCLI(**objective_cli_kwargs(), run=run, args=argv)


def main(argv: list[str] | None = None) -> None:
    from lightning_unlearn import preemption

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    preemption.set_command(argv)
    try:
        with preemption.handle_signals():
            _run(argv)
    except preemption.Preempted as err:  # state saved (or nothing to save): say what to rerun
        preemption.exit_preempted(err)


def _run(argv: list[str]) -> None:
    try:
        if argv[0] == "protocol":
            protocol_main(argv[1:])
        elif argv[0] == "sweep":
            sweep_main(argv[1:])
        elif argv[0] == "evaluate":
            evaluate_main(argv[1:])
        elif argv[0] == "wmdp":
            build_wmdp(argv[1:]).run()
        elif argv[0] == "muse":
            build_muse(argv[1:]).run()
        else:
            lightning_main(None if argv == sys.argv[1:] else argv)
    except Exception as err:  # a UserError, or one jsonargparse re-raised while building the config
        user_error = find_user_error(err)
        if user_error is None:
            raise
        from lightning_unlearn.processes import rank

        if rank() == 0:  # every rank of a launched run stops on the same error: say it once
            print(f"lightning-unlearn: error: {user_error}", file=sys.stderr)
        sys.exit(2)
