"""Refusal answers for the IDK objectives: our own list in the package, or a user's file, and a
seeded choice of one refusal per question."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

from lightning_unlearn.errors import UserError


def load_refusals(refusals: str) -> list[str]:
    """Refusal answers: ``builtin`` (our own list in the package) or a text file, one per line."""
    if refusals == "builtin":
        text = files("lightning_unlearn").joinpath("resources", "refusals.txt").read_text(encoding="utf-8")
        where = "builtin refusals"
    else:
        path = Path(refusals)
        if not path.is_file():
            raise UserError(f"refusals file '{refusals}' does not exist")
        try:
            text, where = path.read_text(encoding="utf-8-sig"), str(path)
        except UnicodeDecodeError as err:
            raise UserError(f"refusals file '{refusals}': not UTF-8 text ({err})") from None
    answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not answers:
        raise UserError(f"{where}: no refusal answers")
    return answers


def refusal_records(records: list[dict], refusals: list[str], seed: int) -> list[dict]:
    """Each question with one refusal answer, chosen by a generator seeded once per run."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(refusals), (len(records),), generator=gen).tolist()
    return [{**r, "answer": refusals[k]} for r, k in zip(records, picks, strict=True)]
