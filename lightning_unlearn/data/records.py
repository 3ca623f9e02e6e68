"""Records (question/answer dicts): validation with errors that name file, row and field, and loading.

A record is ``{"question": str, "answer": str}`` plus optional ``paraphrased_answer``,
``paraphrased_question`` (str) and ``perturbed_answer`` (list of str). Every loaded record gets an
``id`` (its own, or ``"<file>:<row>"``) so forget requests and reports can name it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_unlearn.errors import UserError

REQUIRED_FIELDS = ("question", "answer")
OPTIONAL_TEXT_FIELDS = ("paraphrased_answer", "paraphrased_question")
LIST_FIELDS = ("perturbed_answer",)


def validate_record(record: Any, where: str, require: tuple[str, ...] = ()) -> dict:
    """Return ``record`` if well formed, else raise UserError naming ``where`` (file and row) and the field.

    ``require`` lists optional fields that this use needs (e.g. ``perturbed_answer`` for truth ratio).
    """
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: expected a JSON object with 'question' and 'answer', got {type(record).__name__}"
        )
    for field in REQUIRED_FIELDS + tuple(require):
        if field not in record or record[field] is None:
            raise UserError(f"{where}: missing field '{field}'")
    for field in REQUIRED_FIELDS + OPTIONAL_TEXT_FIELDS:
        if field in record and record[field] is not None:
            value = record[field]
            if not isinstance(value, str):
                raise UserError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
            if not value.strip():
                raise UserError(f"{where}: field '{field}' is empty")
    for field in LIST_FIELDS:
        if field in record and record[field] is not None:
            value = record[field]
            if not isinstance(value, list) or not value:
                raise UserError(f"{where}: field '{field}' must be a non-empty list of strings")
            for j, item in enumerate(value):
                if not isinstance(item, str) or not item.strip():
                    raise UserError(f"{where}: field '{field}' item {j} must be a non-empty string")
    if "id" in record and not isinstance(record["id"], (str, int)):
        raise UserError(f"{where}: field 'id' must be a string or an integer")
    return record


def parse_rows(path: Path) -> list[tuple[int, Any]]:
    """(line or item number, value) pairs from a JSON array file or a JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        return [(i + 1, item) for i, item in enumerate(items)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: row {lineno}: invalid JSON ({err.msg})") from None
    return rows


def load_records(path: str | Path, require: tuple[str, ...] = ()) -> list[dict]:
    """Load and validate records from a ``.json`` (array or JSON Lines, as on the hub) or ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file '{path}' does not exist")
    records = []
    for row, item in parse_rows(path):
        record = dict(validate_record(item, f"{path}: row {row}", require))
        record.setdefault("id", f"{path.name}:{row}")
        records.append(record)
    if not records:
        raise UserError(f"{path}: no records")
    return records
