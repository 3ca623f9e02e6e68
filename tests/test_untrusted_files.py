"""Untrusted files: every way we load a checkpoint, adapter or model refuses a malicious pickle
before it can run, and our own checkpoints still load (they are weights only).

The malicious file is real: ``Payload`` pickles as a call to ``exec`` that creates a marker file,
and ``test_the_payload_really_runs_when_unpickled_unrestricted`` shows it does so when loaded the
unsafe way. Every other test asserts the marker was never created.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, get_peft_model

from lightning_unlearn.adapters import load_factors
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import ModelSpec, load_adapter, load_model
from lightning_unlearn.safe_load import (
    SafeCheckpointCLI,
    SafeTrainer,
    check_checkpoint,
    load_tensors,
    torch_load,
    weights_only_everywhere,
)

# torch names the refused import "exec", our allow-list unpickler "builtins.exec"
EXEC = re.compile(r"would import (builtins\.)?exec\b")


class Payload:
    """Unpickles as ``exec("open(marker, 'w').close()")``: code running from a data file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "payload_ran"
    yield path
    assert not path.exists(), "the malicious pickle ran"


def write_malicious(path: Path, marker: Path, key: str = "state_dict") -> Path:
    """A torch.save file whose ``key`` entry is the payload, as a ``.ckpt``/``.pt``/``.bin`` would be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: Payload(marker), "weight": torch.ones(2)}, path)
    return path


def _tiny(hidden: int = 32):
    return load_model(ModelSpec(config={**TINY_LLAMA, "hidden_size": hidden, "vocab_size": 64}))


def _lora(model):
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def test_the_payload_really_runs_when_unpickled_unrestricted(tmp_path):
    """The control: without weights_only the same file runs its code (so the refusals below matter)."""
    marker = tmp_path / "ran"
    path = write_malicious(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.is_file()


def test_torch_load_refuses_the_pickle_and_names_file_and_import(tmp_path, marker):
    path = write_malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(UserError) as info:
        torch_load(path)
    message = str(info.value)
    assert message.startswith(f"refusing to load '{path}'") and EXEC.search(message)
    assert "\n" not in message


def test_torch_load_refuses_even_when_the_environment_asks_for_unsafe_loading(tmp_path, marker, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns torch's default off, but not an explicit weights_only=True."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UserError, match="refusing to load"):
        torch_load(write_malicious(tmp_path / "evil.pt", marker))


def test_torch_load_reads_tensors_and_plain_values(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0), "step": 7, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}, path)
    loaded = torch_load(path)
    assert torch.equal(loaded["w"], torch.arange(3.0)) and loaded["step"] == 7
    assert loaded["groups"][0]["betas"] == (0.9, 0.99)


@pytest.mark.parametrize(
    "content", [b"", b"hello world" * 10, b"PK\x03\x04garbage"], ids=["empty", "text", "zip"]
)
def test_torch_load_names_a_file_that_is_not_a_torch_file(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"'{path}' is not a PyTorch file"):
        torch_load(path)


def test_weights_only_everywhere_overrides_an_explicit_unsafe_load(tmp_path, marker):
    """torch.distributed.checkpoint asks for weights_only=False on non-tensor entries; inside the
    block that request is overridden, and the environment is restored after it."""
    path = write_malicious(tmp_path / "evil.pt", marker)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with weights_only_everywhere(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before


def test_adapter_bin_pickle_is_refused(tmp_path, marker):
    """peft falls back to adapter_model.bin through torch.load; load_adapter checks it weights-only
    first, whatever the installed peft does."""
    adapter = tmp_path / "adapter"
    _lora(_tiny()).save_pretrained(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    write_malicious(adapter / "adapter_model.bin", marker, key="base_model.model.x.lora_A.weight")
    with pytest.raises(UserError) as info:
        load_adapter(_tiny(), str(adapter))
    assert f"'{adapter / 'adapter_model.bin'}'" in str(info.value) and EXEC.search(str(info.value))


def test_adapter_bin_with_tensors_only_still_loads(tmp_path):
    """Refusing pickles is not refusing .bin: a tensors-only adapter_model.bin loads and equals the original."""
    adapter = tmp_path / "adapter"
    trained = _lora(_tiny())
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()
    trained.save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    loaded = load_adapter(_tiny(), str(adapter))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_model_directory_pickle_is_refused(tmp_path, marker):
    """A model directory whose weights are a malicious pytorch_model.bin (transformers loads it
    weights-only; load_model turns the refusal into one line)."""
    directory = tmp_path / "model"
    _tiny().save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    write_malicious(directory / "pytorch_model.bin", marker)
    with pytest.raises(UserError) as info:
        load_model(ModelSpec(path=str(directory)))
    assert f"refusing to load '{directory}'" in str(info.value) and EXEC.search(str(info.value))


def test_damaged_safetensors_are_named(tmp_path):
    path = tmp_path / "grams.safetensors"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match=f"'{path}' is not a readable safetensors file"):
        load_tensors(path)
    adapter = tmp_path / "adapter"
    _lora(_tiny()).save_pretrained(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"{not a header")
    with pytest.raises(UserError, match="adapter_model.safetensors' is not a readable safetensors file"):
        load_factors(adapter)


# -- Lightning checkpoints ------------------------------------------------------------------------


def _objective(tiny_spec):
    from lightning_unlearn.objectives import GradDiff

    return GradDiff(model=tiny_spec, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def _trainer(tmp_path: Path, max_steps: int, **kwargs) -> SafeTrainer:
    return SafeTrainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs,
    )  # fmt: skip


def test_safe_trainer_resumes_from_our_own_checkpoint(tmp_path, tiny_spec, unlearning_data):
    """Our checkpoints are weights only: a SafeTrainer resumes from one (step count carried on)
    and the resumed weights are the saved ones."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = _trainer(tmp_path, 2, callbacks=[checkpoint])
    objective = _objective(tiny_spec)
    first.fit(objective, datamodule=unlearning_data)
    last = tmp_path / "ck" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["state_dict"]
    steps = []
    counter = Callback()
    counter.on_train_batch_end = lambda *args: steps.append(1)
    resumed = _trainer(tmp_path, 2, enable_checkpointing=False, callbacks=[counter])
    again = _objective(tiny_spec)
    resumed.fit(again, datamodule=unlearning_data, ckpt_path=str(last))
    # restored at step 2 with max_steps 2: no step ran (a fresh start would have run two)
    assert resumed.global_step == 2 and steps == []
    for name, value in again.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_safe_trainer_refuses_a_malicious_checkpoint(tmp_path, marker, tiny_spec, unlearning_data):
    evil = write_malicious(tmp_path / "evil.ckpt", marker)
    trainer = _trainer(tmp_path, 1, enable_checkpointing=False)
    with pytest.raises(UserError) as info:
        trainer.fit(_objective(tiny_spec), datamodule=unlearning_data, ckpt_path=str(evil))
    assert f"refusing to load '{evil}'" in str(info.value) and EXEC.search(str(info.value))


def test_safe_trainer_refuses_weights_only_false(tmp_path, tiny_spec, unlearning_data):
    trainer = _trainer(tmp_path, 1, enable_checkpointing=False)
    with pytest.raises(UserError, match="weights_only=False would unpickle"):
        trainer.fit(_objective(tiny_spec), datamodule=unlearning_data, weights_only=False)


def test_safe_checkpoint_cli_defaults_to_weights_only_and_refuses(tmp_path, marker, world_dir, tokenizer_dir):
    """Through LightningCLI (what ``lightning-unlearn fit --ckpt_path`` builds): --weights_only
    defaults to true, false is refused, and a malicious --ckpt_path stops with our error (LightningCLI
    reads the checkpoint for hyperparameters before any Trainer exists)."""
    from lightning import LightningDataModule

    from lightning_unlearn.objectives.base import UnlearningObjective

    config = {
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "lightning_unlearn.objectives.GradDiff",
                  "init_args": {"model": {"config": TINY_LLAMA, "tokenizer": tokenizer_dir}}},
        "data": {"class_path": "lightning_unlearn.data.datamodule.UnlearningDataModule",
                 "init_args": {"tokenizer": tokenizer_dir, "source": str(world_dir), "forget_split": "forget10",
                               "retain_split": "retain90", "max_length": 64, "batch_size": 2}},
    }  # fmt: skip
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(config))
    evil = write_malicious(tmp_path / "evil.ckpt", marker)

    def cli(*args: str) -> SafeCheckpointCLI:
        return SafeCheckpointCLI(UnlearningObjective, LightningDataModule, subclass_mode_model=True,
                                 subclass_mode_data=True, args=list(args),
                                 save_config_kwargs={"overwrite": True})  # fmt: skip

    built = cli("fit", "--config", str(path))
    assert isinstance(built.trainer, SafeTrainer) and built.config["fit"]["weights_only"] is True
    with pytest.raises(UserError) as info:
        cli("fit", "--config", str(path), "--ckpt_path", str(evil))
    assert str(info.value).startswith(f"refusing to load '{evil}'") and EXEC.search(str(info.value))
    with pytest.raises(UserError, match="weights_only=False would unpickle"):
        cli("fit", "--config", str(path), "--weights_only", "false")


# -- sharded (torch.distributed.checkpoint) directories ------------------------------------------


@pytest.fixture
def dcp_dir(tmp_path) -> Path:
    """A real distributed-checkpoint directory (one process), as FSDP2 writes, plus Lightning's meta.pt."""
    import warnings

    import torch.distributed.checkpoint as dcp

    directory = tmp_path / "sharded.ckpt"
    state = {"model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
             "optimizer": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": a one-process save is what we want
        dcp.save(state, checkpoint_id=str(directory))
    torch.save({"global_step": 3, "loops": {"fit_loop": {"epoch": 1}}}, directory / "meta.pt")
    return directory


def test_check_checkpoint_accepts_a_real_sharded_checkpoint(dcp_dir):
    check_checkpoint(dcp_dir)  # the allow-list covers what torch writes
    check_checkpoint(dcp_dir / "meta.pt")  # a file: left to the weights-only load
    check_checkpoint("last")  # a name Lightning resolves: checked when it arrives resolved


def test_check_checkpoint_refuses_a_malicious_metadata_pickle(dcp_dir, marker):
    """torch reads .metadata with plain pickle.load; our allow-list unpickler reads it first."""
    with (dcp_dir / ".metadata").open("wb") as handle:
        pickle.dump({"state_dict_metadata": Payload(marker)}, handle)
    with pytest.raises(UserError) as info:
        check_checkpoint(dcp_dir)
    assert f"'{dcp_dir / '.metadata'}'" in str(info.value) and EXEC.search(str(info.value))


def test_check_checkpoint_refuses_a_malicious_meta_pt(dcp_dir, marker):
    write_malicious(dcp_dir / "meta.pt", marker)
    with pytest.raises(UserError, match=r"meta.pt'.*would import (builtins\.)?exec"):
        check_checkpoint(dcp_dir)


def test_check_checkpoint_refuses_a_metadata_naming_a_module_function(dcp_dir):
    """Only classes defined in torch's metadata module pass, not what that module imports
    (``dataclasses.field`` is reachable as ``metadata.field``): a hand-written GLOBAL + REDUCE."""
    (dcp_dir / ".metadata").write_bytes(b"ctorch.distributed.checkpoint.metadata\nfield\n)R.")
    with pytest.raises(UserError, match="would import torch.distributed.checkpoint.metadata.field"):
        check_checkpoint(dcp_dir)
