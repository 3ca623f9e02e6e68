"""Kill and resume: a long command killed with SIGKILL at any moment and rerun with the same
command ends with what an uninterrupted run writes, bit for bit, and nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import TINY_LLAMA
from helpers import forget10_data
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LU_PAUSE")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "disabled"
    return {**env, **extra}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kill_when(command: list[str], cwd: Path, ready, **env: str) -> None:
    """Start ``command``, SIGKILL it as soon as ``ready()`` holds."""
    process = subprocess.Popen(command, cwd=cwd, env=_env(**env), stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not ready():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _fit_config(tmp_path: Path, world_dir: Path, tokenizer_dir: str, out: str, lr: float = 1e-2) -> Path:
    """GradDiff + LoRA, AdamW with a linear warm-up schedule (both have state a resume must
    restore), 3 epochs of 2 batches, the adapter exported at the end of fit."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 3, "limit_train_batches": 2,
            "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning_unlearn.callbacks.ExportModel", "init_args": {"dirpath": out}},
                {"class_path": "helpers.PauseAt"},
            ],
        },
        "model": {"class_path": "lightning_unlearn.objectives.GradDiff", "init_args": {
            "model": {"config": dict(TINY_LLAMA), "tokenizer": tokenizer_dir},
            "adapter": {"r": 4, "alpha": 8},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
            "lr_schedule": "linear", "warmup_ratio": 0.3}},
        "data": forget10_data(world_dir, tokenizer_dir, 4),
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path) -> list[str]:
    return [sys.executable, "-m", "lightning_unlearn", "fit", "--config", str(config)]


def test_fit_killed_mid_epoch_resumes_to_the_uninterrupted_adapter(tmp_path, world_dir, tokenizer_dir):
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole_dir.mkdir(), killed_dir.mkdir()
    _run(_fit(_fit_config(whole_dir, world_dir, tokenizer_dir, "adapter")), whole_dir)
    want = load_file(str(whole_dir / "adapter" / "adapter_model.safetensors"))

    # Killed after step 3: epoch 0 (steps 1-2) is checkpointed, epoch 1 is half done.
    config = _fit_config(killed_dir, world_dir, tokenizer_dir, "adapter")
    marker = killed_dir / "paused"
    _kill_when(_fit(config), killed_dir, marker.exists, LU_PAUSE_AT_STEP="3", LU_PAUSE_MARKER=str(marker))
    checkpoints = list((killed_dir / "runs" / "resume").glob("*/last.ckpt"))
    assert len(checkpoints) == 1 and not (killed_dir / "adapter").exists()
    saved = torch.load(checkpoints[0], weights_only=False)
    assert saved["global_step"] == 2 and all("lora_" in k for k in saved["state_dict"])  # the adapter only

    done = _run(_fit(config), killed_dir)  # the same command
    assert "resuming from" in done.stdout + done.stderr
    got = load_file(str(killed_dir / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    moved = max(want[k].abs().max().item() for k in want if "lora_B" in k)  # B starts at zero
    assert moved > 1e-3
    assert not [p for p in killed_dir.rglob("*") if p.name.startswith(".")], "a temporary was left behind"

    # Another learning rate is another run: it starts fresh in its own directory.
    changed = _fit_config(killed_dir, world_dir, tokenizer_dir, "adapter2", lr=2e-2)
    done = _run(_fit(changed), killed_dir)
    assert "resuming from" not in done.stdout + done.stderr
    assert len(list((killed_dir / "runs" / "resume").glob("*/last.ckpt"))) == 2
