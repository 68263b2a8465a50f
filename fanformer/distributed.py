"""Data-parallel plumbing: who am I, talk to the others, and agree on when to stop.

`torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process and every
helper here is a no-op, so the training loop reads the same either way. Gloo on CPU,
NCCL on CUDA. This module knows nothing about models or data; `train.py` calls it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_kind: str) -> World:
    """Join the process group when launched by torchrun (read from its environment)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return World(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 size=dist.get_world_size())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def mean(world: World, value: float, device: torch.device) -> float:
    """The mean of a scalar over ranks."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world.size


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set (e.g. one of them got SIGTERM)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def gather_tensors(world: World, tensors: dict[str, torch.Tensor],
                   device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's copy of `tensors` (same names and shapes on each rank), in rank order."""
    if not world.distributed:
        return [tensors]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world.size)]
    for name, tensor in tensors.items():
        parts = [torch.empty_like(tensor, device=device) for _ in range(world.size)]
        dist.all_gather(parts, tensor.to(device))
        for r, part in enumerate(parts):
            out[r][name] = part.cpu()
    return out


def gather_objects(world: World, obj: object) -> list:
    if not world.distributed:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def shutdown(world: World, clean: bool) -> None:
    """Leave the process group; after a clean finish, wait for every rank first (an error
    exit does not wait: the other ranks may never arrive)."""
    if world.distributed and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
