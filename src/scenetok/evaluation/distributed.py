"""Spreading work items over processes started by ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Rank ``r`` of ``W`` takes the ``r``-th of
``W`` contiguous, near-equal blocks of the ordered work list (:func:`share`), so a process touches as few
bundles as possible and the split does not depend on timing. Every process writes its partial results;
a barrier (torch.distributed, gloo backend, created here when the launcher did not) waits for all of
them; rank 0 merges. Nothing else is exchanged between processes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group (and destroys it in close())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None = None) -> str:
        """``requested``, or ``cuda:LOCAL_RANK`` when CUDA is there, else ``cpu``."""
        import torch

        if requested:
            if requested == "cuda" and self.world_size > 1:
                return f"cuda:{self.local_rank}"
            return requested
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % max(torch.cuda.device_count(), 1)}"
        return "cpu"

    def barrier(self) -> None:
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def context(timeout_hours: float = 48.0) -> DistContext:
    """The process's place in a ``torchrun`` / ``accelerate launch`` job (a single process: rank 0 of 1).

    With more than one process, a gloo process group is initialized when none exists (its barrier waits
    up to ``timeout_hours``: ranks may finish their shares far apart).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=timeout_hours))
            ctx.owns_group = True
    return ctx


def share(n_items: int, rank: int, world_size: int) -> range:
    """The indices of the work items rank ``rank`` of ``world_size`` takes: the ``rank``-th of
    ``world_size`` contiguous blocks, sizes differing by at most one (earlier blocks larger)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    base, extra = divmod(int(n_items), world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
