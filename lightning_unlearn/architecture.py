"""Where the parts of a Hugging Face causal LM are, with or without a peft wrapper: the one place
that knows the attribute paths, for RMU (its steered layer), FSDP2 (its sharding units) and the
logit and decoding code (the model's config)."""

from __future__ import annotations

from torch import nn

from lightning_unlearn.errors import UserError


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks in order: ``layers`` (Llama, Qwen, Mistral, Gemma...) or ``h``
    (GPT-2, Falcon...) of the decoder that ``get_decoder`` returns, else of ``model.model`` or
    ``model.transformer``."""
    base = base_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for owner in (decoder, getattr(base, "model", None), getattr(base, "transformer", None)):
        for name in ("layers", "h"):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList):
                return layers
    raise UserError(f"cannot find the decoder layers of {type(base).__name__} (no layers or h list)")
