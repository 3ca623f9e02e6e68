"""Multiple-choice question sets (WMDP, MMLU) and text corpora from the hub or a local copy.

Hub ids: ``cais/wmdp`` (configs ``wmdp-bio``, ``wmdp-chem``, ``wmdp-cyber``; split ``test``; fields
``question``, ``choices``, ``answer``) and ``cais/mmlu`` (config ``all`` or one subject; fields
``question``, ``subject``, ``choices``, ``answer``), loaded with ``datasets.load_dataset``. A local
copy keeps the hub's file layout, ``<root>/<config>/<split>-00000-of-00001.parquet`` (or ``.json``
/ ``.jsonl``, a JSON array or JSON Lines), or is a single such file. A corpus (WMDP's forget
corpora, wikitext) is rows with a ``text`` field, in the same layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_unlearn.data.records import parse_rows
from lightning_unlearn.errors import UserError

WMDP_HUB_ID = "cais/wmdp"
MMLU_HUB_ID = "cais/mmlu"
WMDP_CONFIGS = ("wmdp-bio", "wmdp-chem", "wmdp-cyber")
# lm-eval's task descriptions name these subjects (lm_eval/tasks/wmdp/wmdp_*.yaml).
WMDP_SUBJECTS = {"wmdp-bio": "biology", "wmdp-chem": "chemistry", "wmdp-cyber": "cybersecurity"}
SUFFIXES = (".parquet", ".jsonl", ".json")


def _local_files(root: Path, config: str | None, split: str) -> list[Path]:
    folder = root / config if config and (root / config).is_dir() else root
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix in SUFFIXES and (p.stem == split or p.stem.startswith(f"{split}-"))
    )
    if not files:
        raise UserError(
            f"no '{split}' files (.parquet, .json, .jsonl) in {folder}: expected the hub's layout "
            f"<root>/<config>/{split}-00000-of-00001.parquet"
        )
    return files


def _read_file(path: Path) -> list[tuple[int, Any]]:
    """(row number from 1, row) pairs of a parquet, JSON array or JSON Lines file."""
    if path.suffix != ".parquet":
        return parse_rows(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{path}: reading parquet needs pyarrow (pip install 'lightning-unlearn[wmdp]')"
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # a damaged or non-parquet file: the user's to fix
        raise UserError(f"{path}: not a readable parquet file ({type(err).__name__})") from None
    return [(i + 1, row) for i, row in enumerate(rows)]


def load_rows(source: str | Path, config: str | None = None, split: str = "test") -> list[tuple[str, Any]]:
    """(where, row) pairs of ``split`` of ``config``: a local file, a local directory in the hub's
    layout, or a hub dataset id (``datasets.load_dataset``)."""
    path = Path(source)
    if path.is_file():
        return [(f"{path}: row {i}", row) for i, row in _read_file(path)]
    if path.is_dir():
        return [(f"{f}: row {i}", row) for f in _local_files(path, config, split) for i, row in _read_file(f)]
    if str(source).startswith((".", "/", "~")) or path.suffix in SUFFIXES:
        raise UserError(f"data source '{source}' does not exist")
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(
            f"loading '{source}' from the hub needs the datasets package (pip install "
            "'lightning-unlearn[wmdp]'), or pass a local copy in the hub's layout"
        ) from None
    try:
        dataset = load_dataset(str(source), config, split=split)
    except Exception as err:  # offline, gated, missing config or split: all user-fixable
        raise UserError(
            f"could not load split '{split}' of '{source}' ({config}) from the hub ({type(err).__name__}): "
            "pass a local copy in the hub's layout instead"
        ) from None
    return [(f"{source} ({config}) {split} row {i + 1}", dict(row)) for i, row in enumerate(dataset)]


def validate_question(row: Any, where: str) -> dict:
    """A multiple-choice row, checked: ``question`` (text), ``choices`` (2+ texts), ``answer``
    (an index into choices); ``subject`` optional text."""
    if not isinstance(row, dict):
        raise UserError(
            f"{where}: expected an object with question, choices and answer, got {type(row).__name__}"
        )
    for name in ("question", "choices", "answer"):
        if row.get(name) is None:
            raise UserError(f"{where}: missing field '{name}'")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise UserError(f"{where}: field 'question' must be non-empty text")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"{where}: field 'choices' must be a list of at least 2 texts")
    for j, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise UserError(f"{where}: field 'choices' item {j} must be text, got {type(choice).__name__}")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(
            f"{where}: field 'answer' must be an index from 0 to {len(choices) - 1}, got {answer!r}"
        )
    if "subject" in row and row["subject"] is not None and not isinstance(row["subject"], str):
        raise UserError(f"{where}: field 'subject' must be text")
    return row


def load_questions(
    source: str | Path, config: str | None = None, split: str = "test", limit: int | None = None
) -> list[dict]:
    """Validated questions ``{"question", "choices", "answer", "subject"}``. ``subject`` (lm-eval's
    description topic) is WMDP's from its config name, MMLU's its ``subject`` field with spaces."""
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    default = WMDP_SUBJECTS.get(config or "", "")
    questions = []
    for where, row in load_rows(source, config, split):
        row = validate_question(row, where)
        subject = (row.get("subject") or default).replace("_", " ")
        questions.append({"question": row["question"], "choices": list(row["choices"]),
                          "answer": row["answer"], "subject": subject})  # fmt: skip
        if limit is not None and len(questions) == limit:
            break
    if not questions:
        raise UserError(f"'{source}' ({config}, {split}) holds no questions")
    return questions


def load_texts(
    source: str | Path,
    config: str | None = None,
    split: str = "train",
    field: str = "text",
    min_chars: int = 0,
) -> list[str]:
    """A corpus's texts (``field`` of each row), skipping those shorter than ``min_chars`` (wikitext
    has many empty lines; WMDP's RMU keeps texts over 50 characters)."""
    texts = []
    for where, row in load_rows(source, config, split):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise UserError(f"{where}: expected an object with a text field '{field}'")
        if len(row[field]) >= max(min_chars, 1):
            texts.append(row[field])
    if not texts:
        raise UserError(f"'{source}' ({config}, {split}) holds no texts of at least {min_chars} characters")
    return texts
