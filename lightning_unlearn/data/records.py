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
            _check_unicode(value, f"{where}: field '{field}'")
    for field in LIST_FIELDS:
        if field in record and record[field] is not None:
            value = record[field]
            if not isinstance(value, list) or not value:
                raise UserError(f"{where}: field '{field}' must be a non-empty list of strings")
            for j, item in enumerate(value):
                if not isinstance(item, str) or not item.strip():
                    raise UserError(f"{where}: field '{field}' item {j} must be a non-empty string")
                _check_unicode(item, f"{where}: field '{field}' item {j}")
    if "id" in record:
        value = record["id"]
        # bool is an int to Python, but `true` as an id is a mistake, not a name
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise UserError(f"{where}: field 'id' must be a string or an integer, got {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            raise UserError(f"{where}: field 'id' is empty")
    return record


def _check_unicode(text: str, where: str) -> None:
    """JSON escapes can spell a lone surrogate (``"\\ud800"``), which is not text: the tokenizer
    would fail on it deep inside training instead of here, with the row named."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where} holds an invalid Unicode escape (a lone surrogate)") from None


def _json(text: str) -> Any:
    """``json.loads`` whose other failures (too deeply nested, an integer too long to convert)
    are ValueError or RecursionError, not JSONDecodeError; each becomes the caller's message."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def parse_rows(path: Path) -> list[tuple[int, Any]]:
    """(line or item number, value) pairs from a JSON array file or a JSON Lines file."""
    try:
        # utf-8-sig: editors on Windows start files with a byte-order mark, which is not JSON
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
    if text.lstrip().startswith("["):
        try:
            items = _json(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        except ValueError as err:
            raise UserError(f"{path}: invalid JSON ({err})") from None
        return [(i + 1, item) for i, item in enumerate(items)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, _json(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: row {lineno}: invalid JSON ({err.msg})") from None
        except ValueError as err:
            raise UserError(f"{path}: row {lineno}: invalid JSON ({err})") from None
    return rows


def load_records(path: str | Path, require: tuple[str, ...] = ()) -> list[dict]:
    """Load and validate records from a ``.json`` (array or JSON Lines, as on the hub) or ``.jsonl`` file.

    Ids must be unique within the file (compared as text, as ``records_by_id`` looks them up): a
    forget request or a report that names an id must name one record.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file '{path}' does not exist")
    records = []
    rows_by_id: dict[str, int] = {}
    for row, item in parse_rows(path):
        record = dict(validate_record(item, f"{path}: row {row}", require))
        record.setdefault("id", f"{path.name}:{row}")
        key = str(record["id"])
        if key in rows_by_id:
            raise UserError(f"{path}: row {row}: id {key!r} is also the id of row {rows_by_id[key]}")
        rows_by_id[key] = row
        records.append(record)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def check_disjoint(forget: list[dict], retain: list[dict], forget_where: str, retain_where: str) -> None:
    """Refuse a forget record that also sits in the retain set (the same id, or the same question
    and answer): training would push it out and pull it back in at once, and the retain model
    would have seen what it is meant never to have seen. ``*_where`` name the two files or splits.
    """
    by_id = {str(r["id"]): r for r in retain}
    by_text = {(r["question"], r["answer"]): r for r in retain}
    for record in forget:
        same_id = by_id.get(str(record["id"]))
        other = same_id or by_text.get((record["question"], record["answer"]))
        if other is not None:
            why = "the same id" if same_id is not None else "the same question and answer"
            raise UserError(
                f"forget record {record['id']!r} ({forget_where}) is also in the retain set as record "
                f"{other['id']!r} ({retain_where}): {why}; a record cannot be both forgotten and kept"
            )
