"""Process-group setup for ``torchrun``: DDP with gloo on CPU and nccl on GPU; one process otherwise."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size and device. ``rank == 0`` writes all files."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (in place; returned)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """p.grad of every parameter that has one replaced by its mean over ranks (one all-reduce)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        for g, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(mean.view_as(g))


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl with one GPU per local
    rank when CUDA is available, gloo on CPU. Returns Dist() for a plain single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def leave_process_group() -> None:
    """destroy_process_group, once every DistributedDataParallel wrapper is gone (drop them first; garbage
    in reference cycles is collected here). A process group that DDP's reducer frees is destroyed while
    the GIL is held, and a gloo worker thread may still need the GIL to release a finished collective's
    tensors: a deadlock (with the other order a two-process test hung in 2 of 5 runs of the test suite or
    its first 109 tests) or an abort at exit. destroy_process_group releases the GIL while it frees the
    group."""
    gc.collect()
    dist.destroy_process_group()
