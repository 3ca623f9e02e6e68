"""TOFU splits from the hub id ``locuslab/TOFU`` or from a local directory in the hub's file layout."""

from __future__ import annotations

from pathlib import Path

from lightning_unlearn.data.records import load_records
from lightning_unlearn.errors import UserError

TOFU_HUB_ID = "locuslab/TOFU"
TOFU_SPLITS = (
    "full",
    "forget01",
    "forget05",
    "forget10",
    "retain99",
    "retain95",
    "retain90",
    "forget01_perturbed",
    "forget05_perturbed",
    "forget10_perturbed",
    "retain_perturbed",
    "real_authors",
    "real_authors_perturbed",
    "world_facts",
    "world_facts_perturbed",
    "holdout01",
    "holdout05",
    "holdout10",
)


def split_file(source: str | Path, split: str) -> Path:
    """Path of ``split``'s file: in a local directory, or downloaded from the hub into its cache."""
    local = Path(source)
    if local.is_dir():
        path = local / f"{split}.json"
        if not path.is_file():
            available = sorted(p.stem for p in local.glob("*.json"))
            raise UserError(
                f"unknown split '{split}' in {local}: available splits are {', '.join(available)}"
            )
        return path
    if local.suffix in (".json", ".jsonl") or str(source).startswith((".", "/", "~")):
        raise UserError(f"data source '{source}' does not exist")
    if str(source) == TOFU_HUB_ID and split not in TOFU_SPLITS:
        raise UserError(f"unknown TOFU split '{split}': choose from {', '.join(TOFU_SPLITS)}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=str(source), filename=f"{split}.json", repo_type="dataset"))
    except Exception as err:  # offline, missing repo or file: all user-fixable
        raise UserError(
            f"could not fetch split '{split}' of dataset '{source}' from the hub ({type(err).__name__}); "
            "pass a local directory holding the split files instead"
        ) from None


def load_split(source: str | Path, split: str, require: tuple[str, ...] = ()) -> list[dict]:
    """Validated records of one split; ``source`` is a hub id, a directory, or a single JSON/JSONL file."""
    path = Path(source)
    if path.is_file():
        return load_records(path, require)
    return load_records(split_file(source, split), require)


def split_where(source: str | Path, split: str) -> str:
    """Where ``split`` of ``source`` is, for messages: its file when local, else the hub split."""
    path = Path(source)
    if path.is_file():
        return str(path)
    if path.is_dir():
        return str(path / f"{split}.json")
    return f"split '{split}' of {source}"
