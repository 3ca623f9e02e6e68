"""decoder_layers: the one lookup of a causal LM's transformer blocks (RMU's steered layer, FSDP2's
sharding units), checked against a scan of the module tree by class name and on two layouts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lightning_unlearn.architecture import decoder_layers
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import LoraSpec, attach_lora, load_model


def test_llama_layers_with_and_without_peft_match_a_class_name_scan(tiny_spec):
    model = load_model(tiny_spec)
    scanned = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert list(decoder_layers(model)) == scanned and len(scanned) == model.config.num_hidden_layers
    wrapped = attach_lora(model, LoraSpec(r=2, alpha=4))
    assert list(decoder_layers(wrapped)) == scanned  # the same module objects, found through peft


def test_gpt2_blocks_and_a_model_without_layers():
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    assert list(decoder_layers(gpt2)) == list(gpt2.transformer.h) and len(gpt2.transformer.h) == 3
    with pytest.raises(UserError, match="^cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))
