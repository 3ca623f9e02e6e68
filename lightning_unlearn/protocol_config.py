"""A protocol config read in ``fit``'s dialect: jsonargparse over ``Protocol``'s signature and its
dataclasses (``class_path``/``init_args`` objectives, unknown keys refused by name), and an
``objectives`` entry that may name a fit config to take its objective and
Trainer settings from, the entry's own keys on top:

    objectives:
      npo: {config: configs/tofu/npo.yaml, max_epochs: 2}

The fit config is parsed by ``fit``'s own parser (``objective_cli.parse_fit_config``). What a
stage takes from it and what the protocol supplies instead is ``fit_stage``'s docstring (and
docs/running.md); a key a stage cannot honour is refused, never dropped.
"""

from __future__ import annotations

import copy
import functools
import importlib
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import register_type

from lightning_unlearn.errors import UserError, find_user_error
from lightning_unlearn.protocol import Protocol, Stage
from lightning_unlearn.trainer_args import jsonargparse_problem

EXPORT_MODEL = "lightning_unlearn.callbacks.export.ExportModel"


class StageEntry:
    """A stage's mapping as written, kept unparsed (jsonargparse would build the ``class_path``
    specs inside a plain mapping) until a fit config it names is merged in."""

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value


def _stage_entry(value: Any) -> StageEntry:
    if isinstance(value, StageEntry):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"a stage is a mapping of settings, got {value!r}")
    return StageEntry(value)


def _written(entry: StageEntry | dict[str, Any]) -> dict[str, Any]:
    """The mapping as written (a parsed namespace may hand a stage back as it or as its mapping)."""
    return entry.value if isinstance(entry, StageEntry) else entry


register_type(StageEntry, serializer=lambda entry: entry.value, deserializer=_stage_entry)


def protocol_parser(exit_on_error: bool = True) -> ArgumentParser:
    """The parser of a protocol config: ``--config`` and every ``Protocol`` setting. The
    ``objectives`` entries are read as mappings here and parsed one by one as ``Stage``
    (``build_stage``), after a fit config they name is merged in."""
    parser = ArgumentParser(
        prog="lightning-unlearn protocol", description=Protocol.__doc__, exit_on_error=exit_on_error
    )
    parser.add_argument("--config", action=ActionConfigFile, help="protocol YAML (see configs/demo.yaml)")
    parser.add_argument(
        "--benchmark", type=str | None, default=None, help="tofu (the default): the TOFU protocol"
    )
    parser.add_class_arguments(Protocol, None, as_group=False, skip={"objectives"})
    parser.add_argument(
        "--objectives", type=dict[str, StageEntry], required=True, help="name -> unlearning Stage"
    )
    return parser


def build_protocol(argv: list[str]) -> Protocol:
    """The ``Protocol`` a ``protocol`` command line describes, built but not run; a mistake is a
    one-line ``UserError`` naming the config file and the key."""
    where = _config_files(argv)
    parser = protocol_parser(exit_on_error=False)
    try:
        namespace = parser.parse_args(argv)
    except Exception as err:
        raise UserError(f"{where}: {jsonargparse_problem(err)}") from None
    return _build(parser, namespace, where)


def protocol_from_config(config: dict[str, Any], where: str) -> Protocol:
    """The ``Protocol`` of a config given as a mapping (a sweep's edited copy), read as a file is."""
    parser = protocol_parser(exit_on_error=False)
    try:
        namespace = parser.parse_object(copy.deepcopy(config))
    except Exception as err:
        raise UserError(f"{where}: {jsonargparse_problem(err)}") from None
    return _build(parser, namespace, where)


def _build(parser: ArgumentParser, namespace, where: str) -> Protocol:
    try:
        init = parser.instantiate(namespace).as_dict()
    except Exception as err:
        raise UserError(f"{where}: {jsonargparse_problem(err)}") from None
    init.pop("config", None)
    benchmark = init.pop("benchmark", None)
    if benchmark not in (None, "tofu"):  # the command dispatches by name; a sweep's config lands here
        raise UserError(f"{where}: benchmark: {benchmark!r}, but this reads a TOFU protocol config")
    seed = init.get("seed", 0)
    init["objectives"] = {
        name: build_stage(_written(entry), f"objectives.{name}", where, seed)
        for name, entry in init["objectives"].items()
    }
    try:
        return Protocol(**init)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def build_stage(entry: dict[str, Any], key: str, where: str, seed: int) -> Stage:
    """The ``Stage`` of one entry (``key`` is its place, e.g. ``objectives.npo``), a fit config it
    names merged in first (``stage_entry``)."""
    try:
        entry = stage_entry(entry, key, seed)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    parser = _stage_parser()
    try:
        return parser.instantiate(parser.parse_object({"stage": copy.deepcopy(entry)})).stage
    except Exception as err:
        problem = jsonargparse_problem(err).removeprefix("stage: ").removeprefix("stage.")
        raise UserError(f"{where}: {key}: {problem}") from None


@functools.cache
def _stage_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--stage", type=Stage, required=True)
    return parser


def stage_entry(entry: dict[str, Any], key: str, seed: int) -> dict[str, Any]:
    """``entry`` as an inline stage: with ``config`` (a fit config's path, relative to the current
    directory like every path of a protocol config), the stage ``fit_stage`` reads from that file
    with the entry's other keys merged on top (mappings key by key; an ``objective`` of another
    ``class_path`` replaces the file's whole)."""
    if "config" not in entry:
        return entry
    entry = dict(entry)
    path = entry.pop("config")
    if not isinstance(path, str) or not Path(path).is_file():
        raise UserError(f"{key}.config: {path!r} is not a fit config file")
    return _merge(fit_stage(path, seed), entry)


def fit_stage(path: str, seed: int) -> dict[str, Any]:
    """The stage a fit config describes, as an inline entry. Taken: the objective (``model:``'s
    ``class_path`` and ``init_args`` but its ``model``), ``trainer.max_epochs`` as the stage's,
    the other Trainer settings and callbacks, and the data module's ``batch_size`` and
    ``retain_per_forget``. Supplied by the protocol instead: the model to train (``init_args.
    model``: the target), the rest of ``data:`` (source,
    splits, tokenizer, prompt format, refusals), where the model is written (so ``ExportModel``
    callbacks are left out) and the seed. Refused: ``trainer.logger`` (the protocol logs every
    stage), ``seed_everything`` other than the protocol's ``seed``, and ``optimizer``,
    ``lr_scheduler`` or ``ckpt_path``."""
    from lightning_unlearn.objective_cli import parse_fit_config

    try:
        config = _plain(parse_fit_config(path).as_dict())
    except Exception as err:
        user_error = find_user_error(err)
        raise UserError(str(user_error) if user_error else f"{path}: {jsonargparse_problem(err)}") from None
    config.pop("config", None)
    given_seed = config.pop("seed_everything", seed)
    if isinstance(given_seed, bool) or given_seed != seed:
        raise UserError(
            f"{path}: seed_everything: {given_seed!r}, but the protocol seeds every stage with its seed {seed}"
        )
    model = config.pop("model", None)
    if not isinstance(model, dict) or "class_path" not in model:
        raise UserError(f"{path}: model: a stage needs the objective's class_path")
    init_args = {k: v for k, v in (model.get("init_args") or {}).items() if k != "model"}
    stage: dict[str, Any] = {"objective": {"class_path": model["class_path"], "init_args": init_args}}
    trainer = dict(config.pop("trainer", None) or {})
    if "logger" in trainer:
        raise UserError(f"{path}: trainer.logger: the protocol logs every stage itself (its logger setting)")
    if "max_epochs" in trainer:
        stage["max_epochs"] = trainer.pop("max_epochs")
    callbacks = trainer.pop("callbacks", None) or []
    callbacks = [c for c in (callbacks if isinstance(callbacks, list) else [callbacks]) if not _is_export(c)]
    if callbacks:
        trainer["callbacks"] = callbacks
    if trainer:
        stage["trainer"] = trainer
    data = (config.pop("data", None) or {}).get("init_args") or {}
    stage.update({k: data[k] for k in ("batch_size", "retain_per_forget") if k in data})
    for key in config:
        raise UserError(
            f"{path}: {key}: a protocol stage cannot honour it (set it in the objective or trainer)"
        )
    return stage


def _is_export(callback: Any) -> bool:
    """An ``ExportModel`` spec: the protocol writes every stage's model to its own directory."""
    if not isinstance(callback, dict) or not isinstance(callback.get("class_path"), str):
        return False
    module, _, name = callback["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)  # the fit parser has imported it already
    return f"{cls.__module__}.{cls.__qualname__}" == EXPORT_MODEL


def _plain(value: Any) -> Any:
    """A parsed config as plain mappings, without jsonargparse's ``__path__`` bookkeeping."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "__path__"}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, mapping by mapping; lists and values replace, and so does a
    mapping naming another ``class_path`` (the base's init_args belong to another class)."""
    merged = dict(base)
    for key, value in over.items():
        below = merged.get(key)
        other_class = (
            isinstance(value, dict)
            and isinstance(below, dict)
            and "class_path" in value
            and value["class_path"] != below.get("class_path")
        )
        if isinstance(value, dict) and isinstance(below, dict) and not other_class:
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged


def _config_files(argv: list[str]) -> str:
    """The config files a command line names (for errors), or ``command line``."""
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return ", ".join(files) or "command line"
