"""Command line: ``lightning-unlearn {fit,validate,test} --config X.yaml`` (LightningCLI),
``lightning-unlearn protocol --config X.yaml`` (the whole TOFU protocol from one file) and
``lightning-unlearn sweep --config X.yaml`` (a hyper-parameter search over one of its objectives).

Mistakes a user can fix (``UserError``) print one line and exit with status 2, no traceback.
A preempted command (SIGTERM, SLURM's requeue signal) saves its state, prints one line naming the
command to rerun and exits with status 143 (``preemption``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_unlearn.errors import find_user_error

USAGE = """usage: lightning-unlearn {fit,validate,test,protocol,sweep,evaluate} [--config FILE] [--print_config] [--help]

  fit / validate / test   LightningCLI over an UnlearningObjective and a DataModule
  protocol                fine-tune target and retain models, unlearn with each objective,
                          evaluate all of them and write runs/<name>/report.json
  sweep                   search one protocol objective's settings (grid or Optuna TPE),
                          resumable; runs/<name>/sweep.json, sweep.md, pareto.png, best/
  evaluate                the evaluation suite on one saved model (or base model + adapter):
                          report.json, report.md, truth_ratios.png in --out_dir
"""


def build_protocol(argv: list[str]):
    """The ``Protocol`` a ``protocol`` command line describes, built but not run."""
    from lightning_unlearn.protocol_config import build_protocol as build

    return build(argv)


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


def evaluate_main(argv: list[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lightning_unlearn.evaluate import EvaluateCommand

    parser = ArgumentParser(prog="lightning-unlearn evaluate", description=EvaluateCommand.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    parser.add_class_arguments(EvaluateCommand, None, as_group=False)
    init = parser.instantiate(parser.parse_args(argv)).as_dict()
    init.pop("config", None)
    report = EvaluateCommand(**init).run()
    from lightning_unlearn.report import metrics_table

    print(metrics_table({"model": report.metrics}))
    print(f"report: {Path(init['out_dir']) / 'report.json'}")


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
