"""Load a causal LM (hub id, local directory, GGUF file, or a tiny config) and attach LoRA with peft."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from lightning_unlearn.data.tokenizer import check_local, load_tokenizer, resolve_gguf
from lightning_unlearn.errors import ConfigError, UserError, brief
from lightning_unlearn.safe_load import refusal, tensor_names, torch_load

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
        if self.path is not None and not str(self.path).strip():
            raise ConfigError("model.path is empty: give a hub id, a directory or a .gguf file")
        if (self.path is None) == (self.config is None):
            raise UserError(
                "model: give either 'path' (hub id, directory or .gguf file) or 'config', not both"
            )
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.config is not None and "model_type" not in self.config:
            raise UserError("model.config needs a 'model_type' (for example 'llama')")
        if self.config is not None:
            model_type = self.config["model_type"]
            if model_type not in CONFIG_MAPPING:
                raise ConfigError(
                    f"model.config.model_type {model_type!r} is not a model type transformers knows"
                )
            if CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING:
                raise ConfigError(
                    f"model.config.model_type {model_type!r} is not a causal language model "
                    "(transformers has no AutoModelForCausalLM for it)"
                )

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
            raise ConfigError(f"adapter.r must be at least 1, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(
                f"adapter.alpha must be positive (the update is scaled by alpha / r), got {self.alpha}"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("adapter.target_modules is empty: name the modules to adapt, or 'all-linear'")


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
        try:
            config = AutoConfig.for_model(model_type, **kwargs)
        except Exception as err:  # building a config from the user's values: any failure is theirs
            # huggingface_hub's validators wrap the ValueError that says what is wrong
            raise ConfigError(f"model.config: {brief(err.__cause__ or err)}") from None
        with torch.random.fork_rng():
            torch.manual_seed(spec.init_seed)
            try:
                model = AutoModelForCausalLM.from_config(config)
            except (ValueError, TypeError, AttributeError) as err:
                # e.g. hidden_size not divisible by num_attention_heads
                raise ConfigError(f"model.config: cannot build a {model_type} model: {brief(err)}") from None
        return model.to(dtype)
    check_local(spec.path)
    path, gguf_file = resolve_gguf(spec.path, spec.gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    where = f"could not load a causal LM from '{spec.path}'"
    if not gguf_file:  # a GGUF file's config costs a parse of the whole file: leave it to the load
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{where}: no readable model config ({brief(err)})") from None
        _check_causal(config, where)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except pickle.UnpicklingError as err:
        raise UserError(refusal(spec.path, err)) from None
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, EOFError, SafetensorError) as err:
        raise UserError(f"{where}: {brief(err)}") from None
    except RuntimeError as err:
        if "mismatch" not in str(err).lower():
            raise
        # transformers has just logged a table of every mismatched tensor; its error says only that
        raise UserError(
            f"{where}: its weights do not fit its config.json (tensor shapes differ; "
            "transformers' load report above lists them)"
        ) from None
    if gguf_file:
        _drop_gguf_marks(model)
    return model


def _check_causal(config: PretrainedConfig, where: str) -> None:
    """Refuse a model type with no causal-LM head in transformers (T5, a vision model, ...) with
    its name, instead of transformers' list of every class it does support."""
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(
            f"{where}: model_type '{config.model_type}' is not a causal language model "
            "(transformers has no AutoModelForCausalLM for it)"
        )


def _drop_gguf_marks(model: PreTrainedModel) -> None:
    """A GGUF file is dequantised to plain float tensors on load, but transformers still marks the
    model as quantized and refuses ``save_pretrained``; clear the marks so it saves as a normal model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def named_trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad: what an optimiser trains, a
    checkpoint keeps and an influence step edits (a peft model's adapter; every weight without one)."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    Non-reentrant, so it works with frozen inputs (LoRA), FSDP2's hooks and double backward.
    transformers 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns); earlier releases, 5.17 on a GPU image among them, have only the old name,
    so both are accepted.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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


def describe_model(model: PreTrainedModel) -> str:
    """A model's name for messages: where it came from, or its shape when built from a config."""
    config = model.config
    name = getattr(config, "_name_or_path", "") or ""
    shape = (
        f"{config.model_type}, hidden_size {getattr(config, 'hidden_size', '?')}, "
        f"{getattr(config, 'num_hidden_layers', '?')} layers"
    )
    return f"'{name}' ({shape})" if name else f"a model built from config ({shape})"


def _adapter_weight_names(directory: Path) -> set[str]:
    """The tensor names of a local adapter, refusing what peft could not or should not load: no
    ``adapter_config.json`` (peft would go looking on the hub), an unreadable config, no weights,
    or an ``adapter_model.bin`` pickle holding more than tensors (checked weights-only here, so
    safety does not hang on the installed peft version's own torch.load call)."""
    config = directory / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"'{directory}' is not a saved peft adapter: '{config.name}' is missing")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"'{config}' is not valid JSON ({err})") from None
    safetensors, pickled = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if safetensors.is_file():
        return tensor_names(safetensors)
    if pickled.is_file():
        state = torch_load(pickled)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"'{pickled}' is not a state dict of tensors")
        return set(state)
    raise UserError(f"'{directory}' holds no adapter weights (adapter_model.safetensors)")


def load_adapter(model: PreTrainedModel, adapter_dir: str, trainable: bool = False) -> PeftModel:
    """Attach a saved peft adapter (e.g. a fine-tuning LoRA that defines the target model).

    An adapter saved for another base model is refused, naming both: peft raises on a size
    mismatch or absent target modules, but loads an adapter for a deeper model silently (the extra
    layers' weights are dropped) and leaves layers the file lacks at their initialisation, so the
    file's tensor names are compared with the adapter's too. On failure ``model`` may already
    carry empty LoRA layers: load the base again.
    """
    check_local(adapter_dir)
    directory = Path(adapter_dir).expanduser()
    names = _adapter_weight_names(directory) if directory.is_dir() else None
    base = describe_model(model)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except pickle.UnpicklingError as err:
        raise UserError(refusal(adapter_dir, err)) from None
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as err:
        raise UserError(f"adapter '{adapter_dir}' does not fit the base model {base}: {brief(err)}") from None
    if names is not None:
        # LoRA factors only: a file may also carry resized embeddings or modules_to_save
        expected = {
            k for k in get_peft_model_state_dict(peft_model, save_embedding_layers=False) if ".lora_" in k
        }
        names = {k for k in names if ".lora_" in k}
        extra, missing = sorted(names - expected), sorted(expected - names)
        if extra or missing:
            detail = (
                f"it has {extra[0]!r}, which the base has no place for"
                if extra
                else (f"it lacks {missing[0]!r}, which the base has")
            )
            raise UserError(
                f"adapter '{adapter_dir}' was saved for another base model than {base}: {detail} "
                f"({len(extra)} tensors without a place, {len(missing)} missing)"
            )
    return peft_model
