"""The launcher's world as the protocol reads it (torchrun's and srun's variables, no processes
started): each stage's devices/num_nodes, the one-line refusals, and the rerun command under
torchrun. The 2-process runs themselves are in tests/distributed/test_protocol_torchrun.py."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from lightning_unlearn import preemption, processes
from lightning_unlearn.errors import UserError

TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}  # fmt: skip
SLURM = {"SLURM_NTASKS": "6", "SLURM_NNODES": "3", "SLURM_NTASKS_PER_NODE": "2(x3)", "SLURM_PROCID": "5",
         "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_JOB_NAME": "unlearn", "SLURM_JOB_ID": "7",
         "SLURM_NODELIST": "node[1-3]"}  # fmt: skip


@pytest.fixture
def environ(monkeypatch):
    """A clean launcher environment: set one with ``environ(dict)``."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in TORCHRUN:
            monkeypatch.delenv(key)

    def set_all(values: dict[str, str]) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_all


@pytest.mark.parametrize(("variables", "rank", "layout"), [(TORCHRUN, 3, (2, 2)), (SLURM, 5, (2, 3))])
def test_launched_world_sets_every_stage_to_the_launchers_layout(environ, variables, rank, layout):
    environ(variables)
    environment = processes.launched_environment()
    assert environment is not None and processes.rank() == rank  # before any process group
    assert processes.layout(environment) == layout
    devices, nodes = layout
    want = {"devices": devices, "num_nodes": nodes}
    assert processes.trainer_layout({}, "stage 'x'") == want
    assert processes.trainer_layout({"devices": "auto", "num_nodes": nodes}, "stage 'x'") == want
    with pytest.raises(UserError) as error:  # the protocol's own default of one device is not kept
        processes.trainer_layout({"devices": 1}, "stage 'ga'")
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "stage 'ga': trainer.devices: 1, but the launcher started"
    )
    assert message.endswith(f"set devices: {devices} or leave it out")


def test_one_process_refuses_more_devices_than_it_has(environ):
    environ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "unlearn", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0"})  # fmt: skip
    assert processes.launched_environment() is None and processes.rank() == 0
    assert processes.trainer_layout({"devices": 1, "strategy": "ddp"}, "stage 'x'") == {}
    for asked in ({"devices": 2}, {"devices": [0, 1]}, {"num_nodes": 2}):
        with pytest.raises(UserError, match=r"^stage 'gd': trainer\.\w+: .* torchrun --nproc-per-node N"):
            processes.trainer_layout(asked, "stage 'gd'")
    assert processes.rank_zero(lambda: 42) == 42  # no group: just the call


def test_rerun_command_under_torchrun_is_the_agents_command(environ, monkeypatch):
    """A worker's rerun line repeats its parent's (torchrun's) command line, read from /proc, with
    the rerun's extra arguments after it; without torchrun it names the worker's own command."""
    monkeypatch.setattr(preemption, "_command", ["protocol", "--config", "p.yaml"])
    assert "torch.distributed.run" not in preemption.rerun_command()
    environ({"TORCHELASTIC_RUN_ID": "x"})
    monkeypatch.setattr(os, "getppid", os.getpid)  # this process stands in for the agent
    own = [part.decode() for part in Path(f"/proc/{os.getpid()}/cmdline").read_bytes().split(b"\0") if part]
    assert preemption.rerun_command(["--ckpt_path", "a b"]) == (
        f"cd {shlex.quote(os.getcwd())} && {shlex.join([*own, '--ckpt_path', 'a b'])}"
    )
