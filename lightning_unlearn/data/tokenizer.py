"""Load a tokenizer from a hub id, a local directory or a GGUF file, ready for batching."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_unlearn.errors import UserError, brief


def resolve_gguf(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Split ``dir/model.gguf`` into ``(dir, "model.gguf")``, the form transformers expects."""
    if gguf_file is None and path.endswith(".gguf"):
        p = Path(path)
        return str(p.parent), p.name
    return path, gguf_file


def check_local(path: str) -> None:
    """A path that looks local and is missing gets a clear error instead of a hub lookup. Hub ids
    are ``name`` or ``namespace/name`` (dots allowed: ``meta-llama/Llama-3.2-1B``); a leading
    ``.``/``/``/``~``, a weights-file suffix or two or more ``/`` (``runs/x/models/finetuned``)
    make a local path."""
    looks_local = (
        path.startswith((".", "/", "~"))
        or path.endswith((".gguf", ".safetensors", ".bin", ".json", ".pt"))
        or path.count("/") >= 2
    )
    if looks_local and not Path(path).expanduser().exists():
        raise UserError(
            f"model path '{path}' does not exist: train or export the model there first (a protocol "
            f"run writes runs/<name>/models/), or point the config at an existing directory or a hub id"
        )


def load_tokenizer(path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer at ``path``, with a pad token (EOS if it has none) and right padding."""
    check_local(path)
    path, gguf_file = resolve_gguf(path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from '{path}': {brief(err)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
