"""Load a causal LM (hub id, local directory, GGUF file, or a tiny config) and attach LoRA with peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lightning_unlearn.data.tokenizer import check_local, load_tokenizer, resolve_gguf
from lightning_unlearn.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Where the model comes from.

    ``path``: a hub id, a local directory, or a ``.gguf`` file (dequantised to ``dtype``). With
    ``config`` (e.g. ``{"model_type": "llama", "hidden_size": 64, ...}``) the model is built from
    scratch instead, with ``vocab_size`` taken from the tokenizer when not given.
    """

    path: str | None = None
    gguf_file: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    init_seed: int = 0

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise UserError(
                "model: give either 'path' (hub id, directory or .gguf file) or 'config', not both"
            )
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.config is not None and "model_type" not in self.config:
            raise UserError("model.config needs a 'model_type' (for example 'llama')")

    @property
    def tokenizer_path(self) -> str:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.path is None:
            raise UserError("model: a model built from 'config' needs 'tokenizer' (a hub id or directory)")
        return self.path


@dataclass
class LoraSpec:
    """LoRA hyper-parameters passed to peft's ``LoraConfig``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserError(f"adapter.r must be at least 1, got {self.r}")


def load_spec_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer belonging to ``spec`` (from its GGUF file too)."""
    gguf = spec.gguf_file if spec.tokenizer is None else None
    return load_tokenizer(spec.tokenizer_path, gguf)


def load_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """The causal LM described by ``spec``, in ``spec.dtype``."""
    dtype = DTYPES[spec.dtype]
    if spec.config is not None:
        kwargs = dict(spec.config)
        model_type = kwargs.pop("model_type")
        if "vocab_size" not in kwargs:
            tokenizer = tokenizer or load_spec_tokenizer(spec)
            kwargs["vocab_size"] = len(tokenizer)
        if tokenizer is not None:
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
            kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
        config = AutoConfig.for_model(model_type, **kwargs)
        with torch.random.fork_rng():
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(config)
        return model.to(dtype)
    check_local(spec.path)
    path, gguf_file = resolve_gguf(spec.path, spec.gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a causal LM from '{spec.path}': {err}") from None
    if gguf_file:
        _drop_gguf_marks(model)
    return model


def _drop_gguf_marks(model: PreTrainedModel) -> None:
    """A GGUF file is dequantised to plain float tensors on load, but transformers still marks the
    model as quantized and refuses ``save_pretrained``; clear the marks so it saves as a normal model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def attach_lora(model: PreTrainedModel, lora: LoraSpec) -> PeftModel:
    """Wrap ``model`` with a trainable LoRA adapter; every base weight is frozen."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_adapter(model: PreTrainedModel, adapter_dir: str, trainable: bool = False) -> PeftModel:
    """Attach a saved peft adapter (e.g. a fine-tuning LoRA that defines the target model)."""
    check_local(adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
