"""Trainer arguments from a config, read as LightningCLI reads ``fit``'s ``trainer:`` section: the
same parser over ``lightning.Trainer``'s signature, so a misspelt key or a wrong value is refused
by name, and ``class_path``/``init_args`` specs (a strategy, callbacks, plugins) become objects.

The protocol keeps the settings, not the objects: every stage's Trainer needs its own strategy
and callbacks, so each call builds fresh ones."""

from __future__ import annotations

import functools
import re
from argparse import ArgumentError
from typing import Any

from lightning import Trainer

from lightning_unlearn.errors import UserError, find_user_error


@functools.cache
def _parser():
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    # ``instantiate=False``: the group stays keyword arguments; only the specs inside it are built.
    parser.add_class_arguments(Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True)
    return parser


def trainer_arguments(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """``settings`` (Trainer keyword arguments, specs allowed) as keyword arguments with every
    spec built anew; ``where`` (e.g. ``objectives.ga.trainer``) starts a refusal."""
    parser = _parser()
    try:
        built = parser.instantiate(parser.parse_object({"trainer": dict(settings)}, defaults=False))
    except (ArgumentError, ValueError, TypeError) as err:
        raise UserError(f"{where}: {jsonargparse_problem(err)}") from None
    return dict(built.trainer.items(branches=False)) if built.get("trainer") else {}


# Lines of a jsonargparse error that only frame the problem, never state it.
_FRAMING = re.compile(
    r"^(- )?(Parser key|Problem with given class_path|Does not validate against|Subtypes:|Errors:|Given value)"
)


def jsonargparse_problem(error: BaseException) -> str:
    """One line from jsonargparse's nested error: the keys down to the problem and its most
    specific statement (``objective: Option 'bta' is not accepted``). A UserError that a
    constructor raised while jsonargparse built it is returned as it is."""
    user_error = find_user_error(error)
    if user_error is not None:
        return str(user_error)
    lines = [
        (len(line) - len(line.lstrip()), line.strip()) for line in str(error).splitlines() if line.strip()
    ]
    statements = [(depth, i) for i, (depth, text) in enumerate(lines) if not _FRAMING.match(text)]
    if not statements:
        return lines[-1][1] if lines else type(error).__name__
    depth, index = max(statements, key=lambda s: (s[0], -s[1]))
    keys = [
        m.group(1)
        for d, text in lines[:index]
        if d < depth and (m := re.match(r'^Parser key "([^"]+)"', text))
    ]
    statement = lines[index][1].removeprefix("- ")
    unknown = re.match(r"Group '([^']+)' does not accept option '([^']+)'", statement)
    if unknown:
        statement = f"{unknown.group(1)}.{unknown.group(2)}: no such setting"
    if statement.startswith(("Expected a", "Subclass types expect")):  # no branch of a Union fits
        given = next((t for _, t in lines if t.startswith("Given value:")), "")
        types = next((t for _, t in lines if t.startswith("Subtypes:")), "")
        statement = f"{given.removeprefix('Given value:').strip()!r} is none of the accepted {types}".strip()
    return ": ".join([*keys, statement])
