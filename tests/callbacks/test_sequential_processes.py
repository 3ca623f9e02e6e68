"""SequentialForgetting as real commands (``lightning-unlearn fit --config``) in subprocesses: a run
preempted (SIGTERM) and one killed (SIGKILL) in the middle of a request, each rerun with the same
command, end with the same fused adapter as an uninterrupted run, and a 2-process ``ddp`` run
equals the 1-process run."""

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
from test_preemption import preempted_line, signal_at

from lightning_unlearn.adapters import load_factors
from lightning_unlearn.data.tofu import load_split

TESTS = Path(__file__).resolve().parents[1]  # helpers.py, conftest.py


SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}
ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}


def _config(
    tmp_path: Path, world_dir: Path, tokenizer_dir: str, name: str, batch_size: int, width: dict | None = None,
    optimizer: dict = SGD,
) -> Path:  # fmt: skip
    """Three requests of four forget records, 3 epochs each, GradDiff + LoRA, SGD; one batch per
    epoch at batch_size 4 (or 2 per rank on 2 ranks), so 1 and 2 processes see the same global
    batches. ``width`` overrides the tiny model's sizes."""
    ids = [str(r["id"]) for r in load_split(str(world_dir), "forget10")][:12]
    requests = [{"name": f"r{k}", "ids": ids[4 * k : 4 * k + 4]} for k in range(3)]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning_unlearn.callbacks.SequentialForgetting",
                    "init_args": {
                        "dirpath": str(tmp_path / name),
                        "requests": requests,
                        "epochs_per_request": 3,
                    },
                },
                {"class_path": "helpers.PauseAt"},
                {"class_path": "helpers.WaitForSignal"},
            ],
        },
        "model": {
            "class_path": "lightning_unlearn.objectives.GradDiff",
            "init_args": {
                "model": {"config": {**TINY_LLAMA, **(width or {})}, "tokenizer": tokenizer_dir},
                "adapter": {"r": 4, "alpha": 8},
                "optimizer": optimizer,
            },
        },
        "data": forget10_data(world_dir, tokenizer_dir, batch_size),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_unlearn", "fit", "--config", str(config), *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LU_PAUSE", "LU_SIGNAL"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "disabled"
    return {**env, **extra}


def _run(command: list[str], cwd: Path, **env: str) -> None:
    done = subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _fused(run: Path) -> dict[str, torch.Tensor]:
    return {name: b @ a for name, (b, a) in load_factors(run / "fused").items()}


def _ledger(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]


def test_preempted_and_killed_mid_request_resume_to_the_uninterrupted_result(
    tmp_path, world_dir, tokenizer_dir
):
    """AdamW (moments a resume must restore), 2 batches an epoch: each request is 6 steps over 3
    epochs. SIGTERM mid-epoch in request r1 saves that step (adapter, optimiser, loader position,
    the callback's request and epoch numbering) and the rerun continues it there; SIGKILL in r2 of
    that rerun loses r2's steps and the next rerun trains r2 again from its start. The fused
    adapter equals the uninterrupted run's."""
    whole = _config(tmp_path, world_dir, tokenizer_dir, "whole", batch_size=2, optimizer=ADAMW)
    _run(_command(whole), tmp_path)

    killed = _config(tmp_path, world_dir, tokenizer_dir, "killed", batch_size=2, optimizer=ADAMW)
    run_dir = tmp_path / "killed"
    # r0 trains steps 1..6, r1 7..12 (epochs 3, 4, 5): step 9 is the first batch of epoch 4.
    done = signal_at(_command(killed), tmp_path, 9)
    assert done.returncode == 143, done.stderr[-3000:]
    checkpoint = run_dir / "preempted.ckpt"
    assert preempted_line(done.stderr).startswith(
        f"lightning-unlearn: preempted by SIGTERM; state saved to {checkpoint}; rerun: cd "
    )
    assert preempted_line(done.stderr).endswith(shlex.join(_command(killed)))
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 9 and saved["epoch"] == 4
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == 1
    state = saved["callbacks"]["SequentialForgetting"]
    assert (state["request"], state["base"]) == (1, 0)
    assert any(s["exp_avg"].abs().max() > 0 for s in saved["optimizer_states"][0]["state"].values())
    ledger = _ledger(run_dir)
    assert [(e["name"], e["status"]) for e in ledger] == [("r0", "done"), ("r1", "running")]
    (tmp_path / "killed_r0.json").write_text(
        json.dumps({k: ledger[0][k] for k in ("ids", "sha256", "start", "end", "metrics")})
    )
    assert not (run_dir / "requests" / "1").exists()

    # The same command resumes r1 at step 10 and finishes it (its checkpoint deleted); killed in r2.
    marker = tmp_path / "paused"
    env = _env(LU_PAUSE_AT_STEP="15", LU_PAUSE_MARKER=str(marker))
    with (tmp_path / "resumed.log").open("w+") as log:
        process = subprocess.Popen(_command(killed), cwd=tmp_path, env=env, stderr=log, stdout=log)
        deadline = time.time() + 240
        while not marker.exists():
            assert process.poll() is None, (tmp_path / "resumed.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never reached the pause"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    assert f"resuming the preempted request from {checkpoint}" in (tmp_path / "resumed.log").read_text()
    ledger = _ledger(run_dir)
    assert [(e["name"], e["status"]) for e in ledger] == [("r0", "done"), ("r1", "done"), ("r2", "running")]
    assert not checkpoint.exists() and not (run_dir / "requests" / "2").exists()
    assert not list(run_dir.glob(".*")), "a temporary file or directory was left behind"

    _run(_command(killed), tmp_path)  # the same command again: r2 from its start
    ledger = _ledger(run_dir)
    assert [(e["name"], e["status"]) for e in ledger] == [("r0", "done"), ("r1", "done"), ("r2", "done")]
    kept = ("ids", "sha256", "start", "end", "metrics")
    first = json.loads((tmp_path / "killed_r0.json").read_text())
    assert {k: ledger[0][k] for k in kept} == first  # request r0's line kept as it was

    want, got = _fused(tmp_path / "whole"), _fused(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    assert max(float(d.abs().max()) for d in want.values()) > 1e-3  # the adapters did train

    # Rerunning a finished run changes nothing; a changed schedule is refused, not silently mixed.
    _run(_command(killed), tmp_path)
    assert _ledger(tmp_path / "killed") == ledger
    swapped = yaml.safe_load(killed.read_text())
    requests = swapped["trainer"]["callbacks"][0]["init_args"]["requests"]
    requests[0]["ids"], requests[1]["ids"] = requests[1]["ids"], requests[0]["ids"]
    killed.write_text(yaml.safe_dump(swapped))
    done = subprocess.run(
        _command(killed), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "no longer matches the schedule" in done.stderr
    assert "Traceback" not in done.stderr and _ledger(tmp_path / "killed") == ledger


# A request's ~80 tokens: more than the tiny model's 32 and 64 inputs (dense Grams, summed over
# ranks), fewer than 128 and 256 (factors of the rows gathered from both ranks; fused by Woodbury
# where the 3 requests' rows stay under 256).
@pytest.mark.parametrize(
    "width", [{}, {"hidden_size": 128, "intermediate_size": 256}], ids=["dense", "factored"]
)
def test_two_process_ddp_equals_one_process(tmp_path, world_dir, tokenizer_dir, width):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    one = _config(tmp_path, world_dir, tokenizer_dir, "one", batch_size=4, width=width)
    _run(_command(one), tmp_path)
    two = _config(tmp_path, world_dir, tokenizer_dir, "two", batch_size=2, width=width)
    _run(_command(two, "--trainer.devices", "2", "--trainer.strategy", "ddp"), tmp_path)

    want, got = _fused(tmp_path / "one"), _fused(tmp_path / "two")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    for k in range(3):
        g1 = _grams(tmp_path / "one", k)
        g2 = _grams(tmp_path / "two", k)
        for name in g1:  # to 1e-5 of the Gram's scale (float32 storage; we measure 1e-7 to 6e-7)
            assert float((g2[name] - g1[name]).abs().max()) <= 1e-5 * float(g1[name].abs().max())
    kinds = {e["kind"] for k in range(3) for run in ("one", "two") for e in _entries(tmp_path / run, k)}
    assert kinds == ({"factor"} if width else {"factor", "dense"})  # tiny: down_proj (64) varies
    solves = set(json.loads((tmp_path / "two" / "fused" / "fusion.json").read_text())["solve"].values())
    assert solves == ({"woodbury", "cholesky"} if width else {"cholesky"})
    assert [e["ids"] for e in _ledger(tmp_path / "one")] == [e["ids"] for e in _ledger(tmp_path / "two")]


def _grams(run: Path, k: int) -> dict[str, torch.Tensor]:
    from lightning_unlearn.adapters import load_grams

    return {n: g.matrix() for n, g in load_grams(run / "requests" / str(k) / "grams.safetensors").items()}


def _entries(run: Path, k: int) -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(run / "requests" / str(k) / "grams.safetensors"), framework="pt") as handle:
        return list(json.loads(handle.metadata()["lightning_unlearn.grams"])["entries"].values())
