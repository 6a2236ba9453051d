"""Multi-process training under ``torchrun``: process group, device, metric reduction.

``torchrun --nproc_per_node N -m convforge train ...`` starts N processes
with RANK / WORLD_SIZE / LOCAL_RANK set; each trains on its shard of every
epoch (DistributedSampler) inside DistributedDataParallel, which averages
gradients. Backend: nccl on CUDA, gloo on CPU. Only rank 0 logs and writes
files. A plain ``convforge train`` is a world of one and skips all of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from convforge.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int  # this process, 0..size-1
    size: int  # number of processes
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present, else CPU. Asking for CUDA without one is a UserError."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but no CUDA device is available; use cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str) -> World:
    """Join the process group if launched by torchrun; return this process's place in it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if size == 1:
        return World(0, 1, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, *values: float) -> list[float]:
    """Sum each value over all processes (identity in a world of one)."""
    if world.size == 1:
        return list(values)
    device = world.device if world.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
