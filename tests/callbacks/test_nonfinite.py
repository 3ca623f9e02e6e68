"""A nan/inf training loss stops fit before its update, keeps the weights of the last fully finite
step in ``<log_dir>/last_good`` and writes no normal output; a bad optimiser argument is a
UserError naming its key.

The numbers tests force the loss to nan from a chosen training batch on, so the expected last
good weights are those of an ordinary run stopped by ``max_steps`` just before that step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from helpers import forget10_data
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_unlearn.callbacks import ExportModel
from lightning_unlearn.callbacks.nonfinite import NonFiniteLoss
from lightning_unlearn.data.datamodule import UnlearningDataModule
from lightning_unlearn.models import LoraSpec, ModelSpec, load_model
from lightning_unlearn.objectives import GradAscent

TESTS = Path(__file__).resolve().parent
LORA = {"r": 4, "alpha": 8}


class NanFrom(GradAscent):
    """GradAscent whose forget loss is multiplied by nan from training batch ``nan_from`` on
    (counted over micro-batches from 0), on global rank ``nan_rank`` only (None: every rank)."""

    def __init__(self, *args, nan_from: int | None = None, nan_rank: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_from, self.nan_rank, self.batches_seen, self.poison = nan_from, nan_rank, 0, False

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.poison = (
            self.nan_from is not None
            and self.batches_seen >= self.nan_from
            and self.nan_rank in (None, self.trainer.global_rank)
        )
        self.batches_seen += 1
        return super().training_step(batch, batch_idx)

    def forget_loss(self, batch: dict) -> Tensor:
        loss = super().forget_loss(batch)
        return loss * float("nan") if self.poison else loss


def _data(world_dir: Path, tokenizer_dir: str) -> UnlearningDataModule:
    return UnlearningDataModule(
        tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10", retain_split="retain90",
        batch_size=2, max_length=64,
    )  # fmt: skip


def _build(tmp_path: Path, name: str, spec: ModelSpec, max_steps: int, accumulate: int = 1,
           **objective) -> tuple[NanFrom, L.Trainer]:  # fmt: skip
    """NanFrom with a LoRA (AdamW lr 1e-2: every step moves the weights) and an ExportModel to
    ``tmp_path/name/out``; default_root_dir ``tmp_path/name`` (no logger, so it is the log dir)."""
    L.seed_everything(0, verbose=False)
    module = NanFrom(
        model=spec, adapter=LoraSpec(**LORA), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **objective
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path / name),
        callbacks=[ExportModel(str(tmp_path / name / "out"), merge=False)],
    )  # fmt: skip
    return module, trainer


def _fit(tmp_path: Path, name: str, spec: ModelSpec, data: UnlearningDataModule, max_steps: int,
         accumulate: int = 1, **objective) -> NanFrom:  # fmt: skip
    module, trainer = _build(tmp_path, name, spec, max_steps, accumulate, **objective)
    trainer.fit(module, datamodule=data)
    return module


def _lora(module: NanFrom) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def _equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("accumulate", "nan_from", "epoch", "step", "good"),
    [(1, 3, 0, 3, 2), (2, 6, 1, 3, 2)],
    ids=["plain", "nan_in_second_micro_batch"],
)
def test_nan_stops_with_the_weights_of_the_last_finite_step(
    tmp_path, tiny_spec, world_dir, tokenizer_dir, accumulate, nan_from, epoch, step, good
):
    """Batch ``nan_from`` is the first nan: its step is stopped, and the weights kept are w_good,
    the ones the last fully finite step started from, bit for bit. forget10 is 5 batches of 2, so
    with 2 micro-batches per step the epoch's last step has one; batch 6 is the second
    micro-batch of step 3 (epoch 1), whose nan disqualifies the whole step though the first was
    finite."""
    module, trainer = _build(tmp_path, "nan", tiny_spec, 10, accumulate, nan_from=nan_from)
    with pytest.raises(NonFiniteLoss) as caught:
        trainer.fit(module, datamodule=_data(world_dir, tokenizer_dir))
    directory = tmp_path / "nan" / "last_good"
    err = caught.value
    assert (err.step, err.last_good_step, err.directory) == (step, good, directory)
    assert str(err) == (
        f"non-finite training loss (nan) at epoch {epoch}, step {step}: stopped before the update; the last "
        f"good adapter (the weights at step {good}, whose loss was finite) is in {directory}"
    )
    assert not (tmp_path / "nan" / "out").exists(), "ExportModel must not write after a non-finite stop"

    # An ordinary run stopped after `good` steps ends with w_good; one more step gives w_step.
    expected = _fit(tmp_path, "ref", tiny_spec, _data(world_dir, tokenizer_dir), good, accumulate)
    after = _fit(tmp_path, "ref_next", tiny_spec, _data(world_dir, tokenizer_dir), good + 1, accumulate)
    saved = load_file(str(directory / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "ref" / "out" / "adapter_model.safetensors"))
    assert _equal(saved, reference)
    later = load_file(str(tmp_path / "ref_next" / "out" / "adapter_model.safetensors"))
    assert not _equal(saved, later), "one step apart must differ, or the test cannot see an off-by-one"
    assert (directory / "adapter_config.json").is_file() and (directory / "tokenizer.json").is_file()
    # The live model was rolled back too: it had already moved on to w_step.
    assert _equal(_lora(module), _lora(expected)) and not _equal(_lora(module), _lora(after))


def test_nan_at_the_first_step_writes_nothing(tmp_path, tiny_spec, world_dir, tokenizer_dir):
    with pytest.raises(NonFiniteLoss, match="step 0, the first step of this fit: stopped, nothing written"):
        _fit(tmp_path, "nan", tiny_spec, _data(world_dir, tokenizer_dir), 10, nan_from=0)
    assert not (tmp_path / "nan" / "last_good").exists() and not (tmp_path / "nan" / "out").exists()


def test_switched_off_the_nan_reaches_the_weights(tmp_path, tiny_spec, world_dir, tokenizer_dir):
    """What the guard prevents: without it the nan gradient is applied and exported as a result."""
    _fit(tmp_path, "off", tiny_spec, _data(world_dir, tokenizer_dir), 3, nan_from=2, stop_on_nonfinite=False)
    saved = load_file(str(tmp_path / "off" / "out" / "adapter_model.safetensors"))
    assert all(t.isnan().all() for k, t in saved.items() if "lora_B" in k)
    assert not (tmp_path / "off" / "last_good").exists()


def _cli_env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    return env


def _run_cli(config: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``lightning-unlearn fit --config`` in its own process group: a deadlocked rank (the bug the
    multi-process test looks for) is killed with its launcher instead of outliving the test."""
    command = [sys.executable, "-m", "lightning_unlearn", "fit", "--config", str(config)]
    process = subprocess.Popen(
        command, cwd=cwd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"fit did not end within {timeout} s (ranks disagreeing would wait forever)")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _config(tmp_path: Path, world_dir: Path, tokenizer_dir: str, objective: dict, optimizer: dict,
            trainer: dict, batch_size: int = 2, name: str = "fit") -> Path:  # fmt: skip
    """A fit config logging to ``tmp_path/name/logs`` and exporting to ``tmp_path/name/out``."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 10,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "logger": {
                "class_path": "CSVLogger",
                "init_args": {"save_dir": str(tmp_path / name / "logs"), "version": 0},
            },
            "callbacks": [
                {
                    "class_path": "lightning_unlearn.callbacks.ExportModel",
                    "init_args": {"dirpath": str(tmp_path / name / "out")},
                }
            ],
            **trainer,
        },
        "model": {
            "class_path": objective["class_path"],
            "init_args": {
                "model": {"config": TINY_LLAMA, "tokenizer": tokenizer_dir},
                "optimizer": optimizer,
                **{"adapter": LORA, **objective.get("init_args", {})},
            },
        },
        "data": forget10_data(world_dir, tokenizer_dir, batch_size),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


LAST_LINE = re.compile(
    r"lightning-unlearn: error: non-finite training loss \((nan|inf|-inf)\) at epoch (\d+), step (\d+): "
    r"stopped before the update; the last good adapter \(the weights at step (\d+), whose loss was "
    r"finite\) is in (.+)"
)


def test_diverging_gradient_ascent_exits_2_with_the_last_good_adapter(tmp_path, world_dir, tokenizer_dir):
    """Gradient ascent with AdamW at lr 1e6 (each step moves every LoRA weight by about 1e6): the
    activations overflow within a few steps. The command exits 2 with one line naming the step and
    the directory, which holds a finite peft adapter; ExportModel's directory is never created."""
    config = _config(
        tmp_path, world_dir, tokenizer_dir, {"class_path": "lightning_unlearn.objectives.GradAscent"},
        {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e6}}, {},
    )  # fmt: skip
    result = _run_cli(config, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, last
    step, good, directory = int(match[3]), int(match[4]), Path(match[5])
    assert 1 <= step < 10 and good == step - 1
    assert directory == tmp_path / "fit" / "logs" / "lightning_logs" / "version_0" / "last_good"
    assert not (tmp_path / "fit" / "out").exists()

    base = load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir))
    model = PeftModel.from_pretrained(base, str(directory))
    saved = load_file(str(directory / "adapter_model.safetensors"))
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert all(t.isfinite().all() for t in saved.values())
    assert max(t.abs().max().item() for t in saved.values()) > 1e5, "the adapter had moved (lr 1e6)"


@pytest.mark.parametrize(
    ("init_args", "expected"),
    [
        ({"lr": -1.0e-3}, "optimizer.init_args.lr must not be negative (Invalid learning rate: -0.001)"),
        ({"lr": 1.0e-3, "betas": [1.5, 0.9]}, "optimizer: Invalid beta parameter at index 0: 1.5"),
    ],
    ids=["negative_lr", "bad_beta"],
)
def test_bad_optimizer_argument_is_a_one_line_user_error(
    tmp_path, world_dir, tokenizer_dir, capsys, monkeypatch, init_args, expected
):
    from lightning_unlearn.cli import main

    monkeypatch.chdir(tmp_path)  # the CLI writes config.yaml and runs/ where it runs

    config = _config(
        tmp_path, world_dir, tokenizer_dir, {"class_path": "lightning_unlearn.objectives.GradAscent"},
        {"class_path": "torch.optim.AdamW", "init_args": init_args}, {"logger": False},
    )  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lightning-unlearn: error: {expected}"
    assert not (tmp_path / "fit" / "out").exists()


STRATEGIES = {
    "ddp": "ddp",
    "fsdp2": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    },
}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize(
    ("strategy", "adapter"), [("ddp", LORA), ("fsdp2", None)], ids=["ddp_lora", "fsdp2_full"]
)
def test_two_processes_stop_together_when_one_rank_sees_nan(
    tmp_path, world_dir, tokenizer_dir, strategy, adapter
):
    """Only rank 1's loss is nan (from its third batch, step 2); rank 0's is finite. Both ranks
    must stop at step 2 (a rank that went on would wait forever in the gradient all-reduce), both
    print the same line, and the last good weights are w_1: what one process on the same global
    batches holds after 1 step. Under FSDP2 (full fine-tuning: every tensor trainable) each rank
    keeps and restores only its own shards, and the export gathers them."""
    from lightning_unlearn.cli import lightning_main

    objective = {
        "class_path": "test_nonfinite.NanFrom",
        "init_args": {"adapter": adapter, "nan_from": 2, "nan_rank": 1},
    }
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}
    two = _config(tmp_path, world_dir, tokenizer_dir, objective, sgd,
                  {"devices": 2, "strategy": STRATEGIES[strategy]}, batch_size=2, name="two")  # fmt: skip
    result = _run_cli(two, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    what = "adapter" if adapter else "model"
    directory = tmp_path / "two" / "logs" / "lightning_logs" / "version_0" / "last_good"
    line = (
        f"lightning-unlearn: error: non-finite training loss (nan) at epoch 0, step 2: stopped before the "
        f"update; the last good {what} (the weights at step 1, whose loss was finite) is in {directory}"
    )
    assert result.stderr.count(line) == 1, result.stderr[-3000:]  # both ranks stop; rank 0 says why
    assert not (tmp_path / "two" / "out").exists()

    # One process, the same global batches (4 rows a step), stopped by max_steps after 1 and 2
    # steps: w_1 is expected, w_2 (the weights the nan step was evaluated at) must be told apart.
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    one_objective = {"class_path": "test_nonfinite.NanFrom", "init_args": {"adapter": adapter}}
    expected = {}
    for steps in (1, 2):
        config = _config(tmp_path, world_dir, tokenizer_dir, one_objective, sgd, {"max_steps": steps},
                         batch_size=4, name=f"one{steps}")  # fmt: skip
        lightning_main(["fit", "--config", str(config)])  # in this process: no second start-up
        expected[steps] = load_file(str(tmp_path / f"one{steps}" / "out" / weights))
    got = load_file(str(directory / weights))
    assert got.keys() == expected[1].keys()

    def error(want: dict[str, Tensor]) -> float:
        """The largest per-tensor error relative to that tensor's largest magnitude."""
        return max((got[k] - want[k]).abs().max().item() / max(want[k].abs().max().item(), 1e-6) for k in got)

    # 2 processes sum in another order: ~1e-7 relative (see tests/distributed/test_scale_out.py).
    assert error(expected[1]) <= 1e-5
    assert error(expected[2]) > 1e-3


class _Line(L.LightningModule):
    """A linear regression, not an objective: the guard needs nothing but ``export``. Its loss is
    nan at training batch ``nan_at``."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.layer, self.nan_at = torch.nn.Linear(2, 1), nan_at

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = (self.layer(x) - y).pow(2).mean()
        return loss * float("nan") if batch_idx == self.nan_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def export(self, directory: Path, merge: bool = True) -> None:
        Path(directory).mkdir(parents=True)
        save_file(
            {n: p.detach().clone() for n, p in self.named_parameters()},
            str(Path(directory) / "w.safetensors"),
        )


def test_guard_on_a_plain_trainer_keeps_the_weights_of_the_step_before(tmp_path):
    """NonFiniteGuard as an ordinary trainer callback: batch 3's loss is nan, so fit stops at step 3
    and last_good holds w_2, the weights after two SGD updates, computed here by a plain loop."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_unlearn.callbacks.nonfinite import NonFiniteGuard

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, generator=generator), torch.randn(8, 1, generator=generator)
    torch.manual_seed(0)
    module = _Line(nan_at=3)
    start = {n: p.detach().clone() for n, p in module.layer.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[NonFiniteGuard()],
    )  # fmt: skip
    with pytest.raises(NonFiniteLoss) as caught:
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=2))
    assert (caught.value.step, caught.value.last_good_step) == (3, 2)
    assert caught.value.directory == tmp_path / "last_good"

    hand = torch.nn.Linear(2, 1)
    hand.load_state_dict(start)
    sgd = torch.optim.SGD(hand.parameters(), lr=0.1)
    states = []
    for i in range(3):  # w_1, w_2, w_3
        sgd.zero_grad()
        (hand(x[2 * i : 2 * i + 2]) - y[2 * i : 2 * i + 2]).pow(2).mean().backward()
        sgd.step()
        states.append({f"layer.{n}": p.detach().clone() for n, p in hand.named_parameters()})
    saved = load_file(str(tmp_path / "last_good" / "w.safetensors"))
    assert _equal(saved, states[1]) and not _equal(saved, states[2])
    live = {n: p.detach() for n, p in module.named_parameters()}
    assert _equal(live, states[1]), "the live model is rolled back from w_3 to w_2"
