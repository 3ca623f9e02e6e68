"""Preemption with real signals: ``fit`` sent SIGTERM (or SLURM's USR1) at a step exits 143 with
one line naming the command to rerun, having saved that very step; the rerun continues from the
next batch and ends with the uninterrupted run's adapter, bit for bit."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from helpers import forget10_data
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
EPOCHS, BATCHES = 2, 3  # 6 optimiser steps


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LU_SIGNAL", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "disabled"
    return {**env, **extra}


def fit_config(path: Path, world_dir: Path, tokenizer_dir: str, trainer: dict | None = None,
               batch_size: int = 4) -> Path:  # fmt: skip
    """GradDiff + LoRA with AdamW and a warm-up schedule (state a resume must restore), 2 epochs
    of 3 batches, one validation batch per epoch, the adapter exported at the end."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS, "limit_train_batches": BATCHES,
            "limit_val_batches": 1, "num_sanity_val_steps": 0, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning_unlearn.callbacks.ExportModel", "init_args": {"dirpath": "adapter"}},
                {"class_path": "helpers.WaitForSignal"},
            ],
            **(trainer or {}),
        },
        "model": {"class_path": "lightning_unlearn.objectives.GradDiff", "init_args": {
            "model": {"config": dict(TINY_LLAMA), "tokenizer": tokenizer_dir},
            "adapter": {"r": 4, "alpha": 8},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            "lr_schedule": "linear", "warmup_ratio": 0.3}},
        "data": forget10_data(world_dir, tokenizer_dir, batch_size),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def fit_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "lightning_unlearn", "fit", "--config", str(config)]


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def signal_at(command: list[str], cwd: Path, step: int, signum: int = signal.SIGTERM, where: str = "train",
              rank: int = 0, **env: str) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``command``; when rank ``rank`` reaches ``step`` (see helpers.WaitForSignal) send it a
    real ``signum`` with os.kill; return the finished process with its output."""
    marker = cwd / f"signal-{step}-{where}"
    marker.unlink(missing_ok=True)
    extra = {"LU_SIGNAL_AT_STEP": str(step), "LU_SIGNAL_MARKER": str(marker), "LU_SIGNAL_IN": where,
             "LU_SIGNAL_RANK": str(rank), **env}  # fmt: skip
    with (cwd / "stderr.log").open("w+") as stderr:
        process = subprocess.Popen(
            command, cwd=cwd, env=_env(**extra), stdout=subprocess.DEVNULL, stderr=stderr
        )
        deadline = time.time() + 240
        while not marker.exists():
            assert process.poll() is None, (cwd / "stderr.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never got there"
            time.sleep(0.02)
        os.kill(int(marker.read_text()), signum)
        code = process.wait(timeout=120)
    return subprocess.CompletedProcess(command, code, "", (cwd / "stderr.log").read_text())


def preempted_line(stderr: str) -> str:
    """The one line a preempted command prints (asserting there is exactly one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("lightning-unlearn: preempted")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory, world_dir, tokenizer_dir) -> dict[str, torch.Tensor]:
    """The uninterrupted run's adapter."""
    work = tmp_path_factory.mktemp("whole")
    run(fit_command(fit_config(work / "fit.yaml", world_dir, tokenizer_dir)), work)
    return adapter(work)


# Mid epoch 1 (after step 5 of 6: 2 of its 3 batches) and in the validation that follows epoch 0
# (the stop comes at the end of that epoch, step 3); early in an epoch (step 1) is the SLURM test's.
@pytest.mark.parametrize(("step", "where", "stopped_at"), [(5, "train", 5), (3, "validation", 3)])
def test_fit_preempted_resumes_at_the_step_to_the_uninterrupted_adapter(
    tmp_path, world_dir, tokenizer_dir, whole, step, where, stopped_at
):
    config = fit_config(tmp_path / "fit.yaml", world_dir, tokenizer_dir)
    command = fit_command(config)
    done = signal_at(command, tmp_path, step, where=where)
    assert done.returncode == 143, done.stderr[-3000:]
    line = preempted_line(done.stderr)
    checkpoints = list((tmp_path / "runs" / "resume").glob("*/last.ckpt"))
    assert len(checkpoints) == 1 and not (tmp_path / "adapter").exists()
    assert line == (
        f"lightning-unlearn: preempted by SIGTERM; state saved to {checkpoints[0].relative_to(tmp_path)}; "
        f"rerun: cd {shlex.quote(str(tmp_path))} && {shlex.join(command)}"
    )
    saved = torch.load(checkpoints[0], weights_only=True)
    assert saved["global_step"] == stopped_at
    loader = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["epoch"] * BATCHES + loader["consumed"] == stopped_at

    rerun = subprocess.run(
        line.split("rerun: ", 1)[1], shell=True, env=_env(), capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout + rerun.stderr
    got = adapter(tmp_path)
    assert got.keys() == whole.keys()
    for key in whole:
        assert torch.equal(got[key], whole[key]), key
    assert max(whole[k].abs().max().item() for k in whole if "lora_B" in k) > 1e-3  # B starts at zero


def test_slurm_requeue_signal_saves_requeues_and_resumes(tmp_path, world_dir, tokenizer_dir, whole):
    """Under SLURM (Lightning's SLURMEnvironment detected from the job's variables) USR1, as sent
    by ``--signal=USR1@90``, early in epoch 0: the step is saved, rank 0 runs ``scontrol requeue
    <job>`` (a stand-in on PATH records it), the exit status is 143, and the requeued job, i.e. the
    same command, ends with the uninterrupted adapter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "unlearn", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    command = fit_command(fit_config(tmp_path / "fit.yaml", world_dir, tokenizer_dir))
    done = signal_at(command, tmp_path, 1, signal.SIGUSR1, **slurm)
    assert done.returncode == 143, done.stderr[-3000:]
    assert preempted_line(done.stderr).startswith(
        "lightning-unlearn: preempted by SIGUSR1; state saved to runs/resume/"
    )
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    (checkpoint,) = (tmp_path / "runs" / "resume").glob("*/last.ckpt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # Lightning's own SLURM handler did not run

    run(command, tmp_path, **slurm)
    got = adapter(tmp_path)
    for key in whole:
        assert torch.equal(got[key], whole[key]), key


def test_protocol_preempted_mid_stage_resumes_that_stage(tmp_path):
    """The protocol sent SIGTERM in the middle of its gradient-ascent stage (evaluated every
    epoch): exit 143, the stage's step saved under the run directory; the same command keeps the
    finished fine-tunes, continues the stage from that step and writes the uninterrupted run's
    model weights and evaluation history."""
    config = {
        "name": "mini", "seed": 0, "out_dir": "runs",
        "model": {"config": dict(TINY_LLAMA, hidden_size=32, intermediate_size=64)},
        "data": {"source": "synthetic", "max_length": 48, "eval_limit": 4,
                 "world": {"seed": 1, "n_authors": 10, "n_forget_authors": 1, "n_world_facts": 4,
                           "n_eval_retain_authors": 2},
                 "eval_splits": {"forget": "forget10_perturbed", "retain": "retain_perturbed"}},
        "finetune": {"objective": {"class_path": "lightning_unlearn.objectives.FineTune"},
                     "max_epochs": 1, "batch_size": 32},
        "objectives": {"ga": {"objective": {"class_path": "lightning_unlearn.objectives.GradAscent",
                                            "init_args": {"optimizer": {"class_path": "torch.optim.AdamW",
                                                                        "init_args": {"lr": 1e-3}}}},
                              "max_epochs": 2, "batch_size": 2, "eval_every_n_epochs": 1,
                              "trainer": {"callbacks": [{"class_path": "helpers.WaitForSignal"}]}}},
        "evaluation": {"batch_size": 8, "max_new_tokens": 4},
        "trainer": {"enable_progress_bar": False},
    }  # fmt: skip
    outputs = {}
    for name in ("whole", "preempted"):
        work = tmp_path / name
        work.mkdir()
        (work / "mini.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        command = [sys.executable, "-m", "lightning_unlearn", "protocol", "--config", str(work / "mini.yaml")]
        run_dir = work / "runs" / "mini"
        if name == "preempted":
            done = signal_at(command, work, 3)  # epoch 0 of ga has 5 steps (10 forget rows, 2 a batch)
            assert done.returncode == 143, done.stderr[-3000:]
            assert preempted_line(done.stderr).endswith(
                f"rerun: cd {shlex.quote(str(work))} && {shlex.join(command)}"
            )
            assert torch.load(run_dir / "preempted" / "ga.ckpt", weights_only=True)["global_step"] == 3
            assert not (run_dir / "models" / "ga").exists()
            rerun = run(command, work)
            assert "finetuned: done before, kept" in rerun.stdout and "ga: resuming from" in rerun.stdout
            assert not (run_dir / "preempted" / "ga.ckpt").exists()
        else:
            run(command, work)
        history = json.loads((run_dir / "histories" / "ga.json").read_text())
        outputs[name] = (load_file(str(run_dir / "models" / "ga" / "model.safetensors")), history)
    (want, want_history), (got, got_history) = outputs["whole"], outputs["preempted"]
    assert [h["step"] for h in want_history] == [0, 5, 10] and got_history == want_history
    for key in want:
        assert torch.equal(got[key], want[key]), key
