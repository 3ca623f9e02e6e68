"""MUSE's data (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language
Models", https://github.com/swj0419/muse_bench) from the hub or a local copy in the hub's layout.

Hub ids ``muse-bench/MUSE-News`` and ``muse-bench/MUSE-Books``. Each is one dataset of configs
(subsets), each a folder ``<config>/<split>-00000-of-00001.parquet`` on the hub:

- ``raw``: splits ``forget``, ``retain1``, ``retain2``, ``holdout``; field ``text`` (documents);
- ``train``: splits ``forget``, ``retain1``, ``retain2``: what the target model was trained on;
- ``verbmem``: split ``forget``; fields ``prompt`` and ``gt`` (a forget-text excerpt and its
  continuation);
- ``knowmem``: splits ``forget_qa``, ``retain_qa`` and the in-context examples ``forget_qa_icl``,
  ``retain_qa_icl``; fields ``question``, ``answer``;
- ``privleak``: splits ``forget``, ``retain``, ``holdout``; field ``text``;
- ``scal`` / ``sust``: splits ``forget_1`` .. ``forget_4`` (scalability and sustainability runs).

A local copy keeps that layout (``.parquet``, ``.json`` or ``.jsonl`` files, as
``data/multiple_choice.py`` reads them). Rows that are not what MUSE's code reads raise a one-line
``UserError`` naming the file, row and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_unlearn.data.multiple_choice import load_rows
from lightning_unlearn.errors import UserError

NEWS_HUB_ID = "muse-bench/MUSE-News"
BOOKS_HUB_ID = "muse-bench/MUSE-Books"


def _text_fields(row: Any, where: str, fields: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with {' and '.join(fields)}, got {type(row).__name__}")
    out = {}
    for name in fields:
        value = row.get(name)
        if value is None:
            raise UserError(f"{where}: missing field '{name}'")
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: field '{name}' must be non-empty text")
        out[name] = value
    return out


def load_fields(
    source: str | Path, config: str, split: str, fields: tuple[str, ...], limit: int | None = None
) -> list[dict[str, str]]:
    """The ``fields`` (each non-empty text) of the first ``limit`` rows of ``split`` of ``config``."""
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    rows = []
    for where, row in load_rows(source, config, split):
        rows.append(_text_fields(row, where, fields))
        if limit is not None and len(rows) == limit:
            break
    if not rows:
        raise UserError(f"'{source}' ({config}, {split}) holds no rows")
    return rows


def load_verbmem(source: str | Path, split: str = "forget", limit: int | None = None) -> list[dict[str, str]]:
    """VerbMem rows ``{"prompt", "gt"}`` (config ``verbmem``)."""
    return load_fields(source, "verbmem", split, ("prompt", "gt"), limit)


def load_knowmem(source: str | Path, split: str, limit: int | None = None) -> list[dict[str, str]]:
    """KnowMem rows ``{"question", "answer"}`` (config ``knowmem``: ``forget_qa``, ``retain_qa``,
    ``forget_qa_icl``, ``retain_qa_icl``)."""
    return load_fields(source, "knowmem", split, ("question", "answer"), limit)


def load_documents(source: str | Path, config: str, split: str, limit: int | None = None) -> list[str]:
    """The ``text`` of each row (configs ``raw``, ``train``, ``privleak``, ``scal``, ``sust``)."""
    return [row["text"] for row in load_fields(source, config, split, ("text",), limit)]
