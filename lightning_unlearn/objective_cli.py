"""The LightningCLI behind ``lightning-unlearn fit``, and a read-only use of its parser: a fit
config parsed exactly as ``fit`` parses it (sub-config files, types, unknown keys), without
seeding or building anything, so a protocol stage can take its settings from the same file."""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from lightning import LightningDataModule

from lightning_unlearn.objectives.adapted import AdaptedModel
from lightning_unlearn.resume import UnlearnCLI


class ObjectiveCLI(UnlearnCLI):
    """LightningCLI over every objective and data module."""

    def instantiate_classes(self) -> None:
        """An objective that trains on refusals (IDK+NLL, IDK+AP, IDK-DPO) gets the built-in ones
        when the data module names none, as in the protocol: so every TOFU config can share one
        data file, and a file of one's own is still ``data.init_args.refusals``. The data module
        reads it in ``setup``, after this."""
        super().instantiate_classes()
        if getattr(self.model, "needs_refusals", False) and getattr(self.datamodule, "refusals", "") is None:
            self.datamodule.refusals = "builtin"


def objective_cli_kwargs() -> dict[str, Any]:
    """The arguments ``fit`` gives ``ObjectiveCLI`` (besides ``args`` and ``run``)."""
    return {
        "model_class": AdaptedModel,  # every objective, and InfluenceStep
        "datamodule_class": LightningDataModule,
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        "trainer_defaults": {
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs"},
            },
        },
    }


class _ParseOnly(ObjectiveCLI):
    """``ObjectiveCLI`` that stops after parsing: only the keys given, no seed set, no class built."""

    def parse_arguments(self, parser, args) -> None:
        self.config = parser.parse_args(args, defaults=False)

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_fit_config(path: str) -> Namespace:
    """The settings the fit config file at ``path`` gives, as ``fit --config path`` reads them
    (sub-configs such as ``data: data.yaml`` resolved), without the defaults it leaves to the
    classes. jsonargparse's ``ArgumentError`` names a key the file gets wrong."""
    cli = _ParseOnly(
        **objective_cli_kwargs(), run=False, args=["--config", path], parser_kwargs={"exit_on_error": False}
    )
    return cli.config
