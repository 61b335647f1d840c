"""FSDP2 for the learner: process group set-up, `fully_shard` per transformer block plus the root, and the
rank-0 streamed full-state gather used for weight publication.

Each decoder block is its own FSDP unit (all-gathered just before it runs, freed after); the root unit
holds the embedding, final norm and LM head. Mixed precision: parameters are stored (and AdamW runs) in
fp32; with `compute_dtype = "bf16"` the all-gathered copies are bf16 and gradients are reduce-scattered in
fp32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`). Backend: gloo on CPU, NCCL on GPU.

Launch (one process per rank; only rank 0 talks ZeroMQ, see services/learner.py):

    # one machine, 2 ranks
    torchrun --standalone --nproc-per-node 2 -m minirl_async.cli learner -c configs/tiny.toml
    # two machines with 8 GPUs each (run on both; node 0's address is the rendezvous endpoint)
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --rdzv-backend c10d \
        --rdzv-endpoint $NODE0_ADDR:29500 -m minirl_async.cli learner -c configs/qwen3_30b_a3b.toml

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init_distributed()` reads them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the process group described by torchrun's environment (no-op when WORLD_SIZE is unset or 1 and
    no group exists). Returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def apply_fsdp(root: nn.Module, blocks: list[nn.Module], compute_dtype: torch.dtype | None,
               device_type: str = "cpu") -> nn.Module:
    """`fully_shard` each block, then the root (which takes every parameter not in a block).
    `compute_dtype` None keeps the parameters' own dtype in forward/backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    # cast_forward_inputs=False: the inputs are token ids and a Routing object (FSDP would try to rebuild it);
    # hidden states are produced inside, in the gathered parameters' dtype.
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None,
                              cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded DTensor) parameter; a collective when sharded."""
    fn = getattr(t, "full_tensor", None)
    return (fn() if fn is not None else t).detach()


def iter_full_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full tensor)` one at a time in HF on-disk naming (per-expert keys).

    Every rank must iterate (each `full_tensor()` is an all-gather); only rank 0 should use the tensors.
    At most one parameter is gathered at a time, so no second full copy of the model is held."""
    from minirl_async.models.hf_io import iter_hf_state

    yield from iter_hf_state(model)  # type: ignore[arg-type]


def broadcast_groups(groups: list[Any] | None, src: int = 0) -> list[Any]:
    """Rank `src` passes its list of `Group`s, the other ranks pass None; every rank returns the same list.
    Uses `torch.distributed.broadcast_object_list` (pickle between the ranks of one learner job only: the
    wire between processes never carries pickle). Without a process group it returns `groups` unchanged."""
    rank, world = rank_world()
    if world == 1:
        if groups is None:
            raise ValueError("broadcast_groups: no groups given and no other rank to receive them from")
        return groups
    box: list[Any] = [groups if rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return list(box[0])
