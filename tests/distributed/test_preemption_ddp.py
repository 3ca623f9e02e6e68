"""Preemption under 2 processes (CPU, gloo): ddp, and FSDP2 (``ModelParallelStrategy``, whose
checkpoint is a sharded directory). SIGTERM sent to rank 1 alone stops both ranks at the same step
with one checkpoint of it, the launching rank prints the one line and exits 143, and the rerun ends
with the uninterrupted 2-process run's adapter."""

from __future__ import annotations

import subprocess

import pytest
import torch
from test_preemption import _env, adapter, fit_command, fit_config, preempted_line, run, signal_at

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

STRATEGIES = {
    "ddp": "ddp",
    "fsdp2": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    },
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes(tmp_path, world_dir, tokenizer_dir, strategy):
    trainer = {"devices": 2, "strategy": STRATEGIES[strategy], "limit_val_batches": 0}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(fit_command(fit_config(whole / "fit.yaml", world_dir, tokenizer_dir, trainer, batch_size=2)), whole)
    want = adapter(whole)

    config = fit_config(killed / "fit.yaml", world_dir, tokenizer_dir, trainer, batch_size=2)
    done = signal_at(fit_command(config), killed, step=2, rank=1)  # mid epoch 0 (2 of its 3 steps)
    assert done.returncode == 143, done.stderr[-3000:]
    line = preempted_line(done.stderr)  # rank 1 stopped too but only rank 0 speaks
    checkpoints = list((killed / "runs" / "resume").glob("*/last.ckpt"))
    assert len(checkpoints) == 1 and not (killed / "adapter").exists()
    assert not list(checkpoints[0].parent.glob(".*")), "a partial checkpoint was left behind"
    if strategy == "fsdp2":  # sharded: every rank wrote its shard, rank 0 the rest to meta.pt
        assert checkpoints[0].is_dir() and len(list(checkpoints[0].glob("*.distcp"))) == 2
        saved = torch.load(checkpoints[0] / "meta.pt", weights_only=True)
    else:
        saved = torch.load(checkpoints[0], weights_only=True)
    assert saved["global_step"] == 2  # rank 0 stopped at rank 1's step, not at a later one
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == 2

    rerun = subprocess.run(
        line.split("rerun: ", 1)[1], shell=True, env=_env(), capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout + rerun.stderr
    got = adapter(killed)
    assert got.keys() == want.keys()
    for key in want:
        assert (got[key] - want[key]).abs().max().item() <= 1e-6, key
    assert max(want[k].abs().max().item() for k in want if "lora_B" in k) > 1e-3
