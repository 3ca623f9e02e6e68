"""The processes of a multi-process protocol: the world a launcher (``torchrun``, ``srun``) started,
the one process group every stage shares, and writes made by rank 0 alone while the others wait.

A protocol is a chain of stages that read what earlier stages wrote (the split files, the
fine-tuned target). Lightning starts its process group at the first ``fit``, too late for the
data preparation before it, so the protocol joins the launcher's world itself at its start; each
stage's Trainer then finds the group already there and uses it (Lightning skips its own
``init_process_group`` when one exists, and never destroys it between fits). Every file the
protocol writes is written on global rank 0 inside ``rank_zero``, which ends with the other ranks
receiving its result: a rank never reads a file before rank 0 has finished writing it.

Without a launcher (a plain ``python -m lightning_unlearn protocol``) the world is one process and
all of this reduces to calling the function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from lightning_unlearn.errors import UserError

T = TypeVar("T")


def launched_environment() -> ClusterEnvironment | None:
    """The cluster environment of a launcher that started this process as one of several (torchrun
    sets ``RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE``, srun ``SLURM_PROCID``/``SLURM_NTASKS``), as
    Lightning would detect it; None for a single process."""
    if TorchElasticEnvironment.detect():
        environment: ClusterEnvironment = TorchElasticEnvironment()
    elif SLURMEnvironment.detect():
        environment = SLURMEnvironment()
    else:
        return None
    return environment if environment.world_size() > 1 else None


def layout(environment: ClusterEnvironment) -> tuple[int, int]:
    """``(devices, num_nodes)`` of the launcher's world: processes per node and nodes, which every
    stage's Trainer must be given (Lightning checks them against the environment)."""
    world = environment.world_size()
    if isinstance(environment, TorchElasticEnvironment):
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        nodes = int(os.environ.get("SLURM_NNODES", "1"))
        per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or world // nodes)
    if per_node < 1 or world % per_node:
        raise UserError(f"the launcher's world of {world} processes is not {per_node} per node on every node")
    return per_node, world // per_node


def trainer_layout(asked: dict[str, Any], where: str) -> dict[str, int]:
    """``devices`` and ``num_nodes`` for a Trainer of this world, given the Trainer arguments
    ``asked`` (``where`` names them in errors). Under a launcher: its layout, and a stage asking
    for another is refused (Lightning would stop with a mismatch, or a stage would wait for ranks
    that never come). For a single process: nothing to set, and more than one device is refused,
    as the protocol starts no processes itself (Lightning's own launcher would re-run the whole
    command at the first fit, with the stages before it done again in every new process)."""
    environment = launched_environment()
    if environment is None:
        for key in ("devices", "num_nodes"):
            value = asked.get(key)
            many = (
                len(value) > 1 if isinstance(value, list | tuple) else str(value).isdigit() and int(value) > 1
            )
            if many:
                raise UserError(
                    f"{where}: trainer.{key}: {value} needs one process per device, started by a launcher: "
                    "torchrun --nproc-per-node N -m lightning_unlearn protocol ... (or srun)"
                )
        return {}
    devices, nodes = layout(environment)
    world = {"devices": devices, "num_nodes": nodes}
    for key, want in world.items():
        value = asked.get(key)
        if value is not None and str(value) not in ("auto", "-1", str(want)):
            raise UserError(
                f"{where}: trainer.{key}: {value}, but the launcher started {environment.world_size()} "
                f"processes ({devices} per node on {nodes} nodes): set {key}: {want} or leave it out"
            )
    return world


def join(accelerator: str = "cpu") -> None:
    """Join the launcher's process group (once; a no-op for a single process). The backend is the
    one Lightning would pick for the stages' device: gloo on CPU; on CUDA, NCCL for the GPU tensors
    and gloo beside it for the CPU tensors the protocol's own evaluation gathers."""
    environment = launched_environment()
    if environment is None or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return
    backend = "gloo"
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(environment.local_rank())
        backend = "cpu:gloo,cuda:nccl"
    os.environ["MASTER_ADDR"] = environment.main_address
    os.environ["MASTER_PORT"] = str(environment.main_port)
    torch.distributed.init_process_group(
        backend, rank=environment.global_rank(), world_size=environment.world_size()
    )


def rank() -> int:
    """This process's global rank: in the joined group, else the launcher's (0 for one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    environment = launched_environment()
    return 0 if environment is None else environment.global_rank()


def rank_zero(fn: Callable[[], T]) -> T:
    """``fn()`` on global rank 0 only (it writes); every rank returns its result once it is done.
    An exception on rank 0 is raised on every rank (a ``UserError`` as itself, with its message),
    so all ranks stop together instead of waiting on each other."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return fn()
    outcome: list[Any] = [None]
    if torch.distributed.get_rank() == 0:
        try:
            outcome[0] = ("ok", fn())
        except Exception as err:  # by name and message: an exception need not pickle
            failed = (type(err).__name__, str(err), isinstance(err, UserError))
            torch.distributed.broadcast_object_list([("error", failed)], src=0)
            raise
    torch.distributed.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        name, message, user = value
        raise UserError(message) if user else RuntimeError(f"rank 0 failed: {name}: {message}")
    return value


def say(text: str) -> None:
    """Print on global rank 0 only (the console is shared by every rank)."""
    if rank() == 0:
        print(text, flush=True)
