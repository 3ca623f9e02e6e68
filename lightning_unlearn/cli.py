"""Command line: ``lightning-unlearn {fit,validate,test} --config X.yaml`` (LightningCLI) and
``lightning-unlearn protocol --config X.yaml`` (the whole TOFU protocol from one file).

Mistakes a user can fix (``UserError``) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import sys

from lightning_unlearn.errors import UserError

USAGE = """usage: lightning-unlearn {fit,validate,test,protocol} [--config FILE] [--print_config] [--help]

  fit / validate / test   LightningCLI over an UnlearningObjective and a DataModule
  protocol                fine-tune target and retain models, unlearn with each objective,
                          evaluate all of them and write runs/<name>/report.json
"""


def protocol_main(argv: list[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lightning_unlearn.protocol import Protocol

    parser = ArgumentParser(
        prog="lightning-unlearn protocol", description=Protocol.__doc__, exit_on_error=True
    )
    parser.add_argument("--config", action=ActionConfigFile, help="protocol YAML (see configs/demo.yaml)")
    parser.add_class_arguments(Protocol, None, as_group=False)
    init = parser.instantiate(parser.parse_args(argv)).as_dict()
    init.pop("config", None)
    Protocol(**init).run()


def lightning_main(argv: list[str] | None, run: bool = True):
    """LightningCLI over every objective and data module; ``run=False`` only builds them (tests)."""
    from lightning import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from lightning_unlearn.objectives.base import UnlearningObjective

    return LightningCLI(
        UnlearningObjective,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=run,
        args=argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs"},
            },
        },
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    try:
        if argv[0] == "protocol":
            protocol_main(argv[1:])
        else:
            lightning_main(None if argv == sys.argv[1:] else argv)
    except UserError as err:
        print(f"lightning-unlearn: error: {err}", file=sys.stderr)
        sys.exit(2)
