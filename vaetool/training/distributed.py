"""PyTorch's own distributed engine: process-group set-up under torchrun, and reductions for reporting."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_type: str) -> World:
    """Join the torchrun job described by the environment (NCCL on GPUs, gloo on CPU), if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over all processes (in place) and return it."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(value: bool, world: World, device: torch.device) -> bool:
    """Rank 0's decision (stop now, say) for everyone, so no process waits on a collective alone."""
    if not world.distributed:
        return value
    flag = torch.tensor([1.0 if value else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def broadcast_value(value: float, world: World, device: torch.device) -> float:
    """Rank 0's number (its clock, say) for everyone, so decisions that depend on it agree across processes."""
    if not world.distributed:
        return value
    box = torch.tensor([value], device=device, dtype=torch.float64)
    dist.broadcast(box, src=0)
    return float(box.item())


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-process statistic over all DDP processes (itself in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value
