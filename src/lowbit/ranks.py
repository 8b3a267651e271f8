"""Data-parallel calibration over ``torch.distributed``: the calibration windows split over ranks, each layer's
statistics summed over all of them, each layer's rounding done by one rank and broadcast.

Started by ``torchrun --nproc-per-node N -m lowbit.cli quantize ...`` (or ``lowbit quantize --nproc N``, which
launches it): every rank loads the model, takes its contiguous share of the windows, runs the same blocks;
statistics (Hessians, channel magnitudes, token counts) are all-reduced before a step uses them, so every rank
sees the statistics of all windows; the rounding of a block's layers is dealt out round-robin and each result
broadcast from the rank that made it.  Rank 0 writes and reports.  The result equals one process's up to the
order in which floating-point sums are added (each rank sums its own windows first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (``world == 1``: a single process, nothing is exchanged)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def owner(self, index: int) -> int:
        """The rank that does item ``index`` of a round-robin deal."""
        return index % self.world

    def share(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items (the first ``n % world`` ranks take one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def current() -> Ranks:
    """The ranks of the initialised default process group, or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env(device: str = "cpu") -> Ranks:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): gloo on CPU, nccl for
    CUDA devices; a single process otherwise."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return current()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return current()


def shard_windows(calib: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's windows of ``calib`` (n, seqlen); each rank must get at least one."""
    if calib.shape[0] < ranks.world:
        raise LowbitError(f"{calib.shape[0]} calibration windows cannot be split over {ranks.world} ranks; pass at "
                          f"least {ranks.world} (--nsamples) or fewer processes")
    return calib[ranks.share(calib.shape[0])]


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` summed (or maxed) over all ranks, in place."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def total(count: int) -> int:
    """``count`` summed over all ranks."""
    return int(all_reduce(torch.tensor([count], dtype=torch.float64)).item())


def broadcast(value: Any, src: int) -> Any:
    """``value`` from rank ``src`` (anything picklable; tensors travel with it)."""
    import torch.distributed as dist

    box = [value if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
