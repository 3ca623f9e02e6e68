"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``ModelParallelStrategy``, and the gathers
that turn sharded parameters back into full tensors for saving and fusing.

Under ``ModelParallelStrategy`` Lightning hands the module a device mesh; ``configure_model``
shards every decoder layer and then the root, so the frozen base and the LoRA factors are both
split across ranks (FSDP2 shards per parameter, so frozen and trainable tensors mix freely in one
layer). Everything that leaves the ranks (an exported adapter, a merged model, a request's
adapter) goes through ``full_state_dict`` first: a collective every rank must call.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_unlearn.architecture import base_model, decoder_layers
from lightning_unlearn.errors import UserError


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2-sharded)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def fully_shard_model(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard each decoder layer, then the root (embeddings, final norm, head) over ``mesh``'s
    data-parallel dimension. Tensor parallelism is not supported: the mesh must be 1 wide there."""
    from torch.distributed.fsdp import fully_shard

    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise UserError(
            "ModelParallelStrategy: tensor parallelism is not supported; set "
            "data_parallel_size to the number of processes and tensor_parallel_size: 1"
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for layer in decoder_layers(model):  # the unit FSDP2 gathers at once
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    # The root unit is the transformers model inside peft's wrapper: ``generate`` calls that
    # model's forward directly, and the root's gather hook must run on every path in.
    root = base_model(model)
    fully_shard(root, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    return model


def full_state_dict(module: nn.Module, keep=None) -> dict[str, torch.Tensor]:
    """Full CPU tensors of ``module``'s state (only the keys ``keep(name)`` accepts), on every
    rank. Sharded: an all-gather per tensor, so every rank must call it; plain: a copy."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, value in module.state_dict().items():
        if keep is not None and not keep(name):
            continue
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[name] = value.detach().cpu().clone()
    return state


def set_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the full tensor ``full`` into ``param``, sharded or not (each rank keeps its shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            shard = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (shares its storage), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
