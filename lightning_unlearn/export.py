"""Writing a model directory: the one place that decides what an exported model looks like.

A directory is what ``save_pretrained`` writes for the model (merged full weights, or a peft
adapter alone), the tokenizer beside it, and any extra text files (an influence step's
``summary.json``). ``export_model`` writes it in one atomic step (``io.atomic_directory``), so a
reader or a resumed run never sees half of it; ``write_model`` fills a directory the caller is
already writing atomically (a sequential request's, which holds more than the model).
Used by ``AdaptedModel.export`` (so ``ExportModel``, ``UnlearningEvaluation``'s best model and
the non-finite guard's ``last_good``), ``SequentialForgetting`` and the protocol.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_unlearn.io import atomic_directory


def merged(model: nn.Module, in_place: bool = False) -> nn.Module:
    """``model`` with a peft adapter folded into its weights (a plain Hugging Face model); a model
    without an adapter as it is. Unless ``in_place``, a copy is merged and ``model`` keeps its
    adapter (a live training model); in place saves a second copy of a model loaded only to be
    exported."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return (model if in_place else copy.deepcopy(model)).merge_and_unload()


def write_model(
    directory: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
    files: Mapping[str, str] | None = None,
) -> None:
    """Save ``model`` (with ``state_dict`` instead of its own tensors, when given: gathered shards),
    ``tokenizer`` and ``files`` (name -> text) into ``directory``, which the caller writes atomically."""
    if state_dict is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, state_dict=dict(state_dict))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for name, text in (files or {}).items():
        (directory / name).write_text(text)


def export_model(
    directory: str | Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    merge: bool = False,
    files: Mapping[str, str] | None = None,
    in_place: bool = False,
) -> Path:
    """Write ``model`` (merged first with ``merge``; see ``merged`` for ``in_place``), its
    tokenizer and ``files`` to ``directory`` in one atomic step, replacing what was there."""
    if merge:
        model = merged(model, in_place)
    with atomic_directory(directory) as tmp:
        write_model(tmp, model, tokenizer, files=files)
    return Path(directory)
