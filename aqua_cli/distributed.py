"""Data-parallel calibration on torch.distributed, launched by ``torchrun`` or ``accelerate launch``.

Calibration is a sum: every window adds its ``X^T X`` to the Gram matrices. So each rank streams its
own shard of the windows (``windows[rank::world]``), and one float64 all-reduce (sum) at the end gives
every rank the Grams that a single process would have accumulated on the same tokens; rank 0
eigen-decomposes them and writes the artifact atomically. The launchers set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; NCCL is used on GPUs, gloo on CPUs.

A failure on one rank must not leave the others waiting in a collective forever: steps that can fail
on one rank alone (loading data, the output check) end in :func:`agree`, an all-reduce of failure flags,
so every rank stops with the same one-line error; a rank that dies outright closes its connections and
the others' next collective raises, within the process-group timeout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch

from .errors import AquaError

T = TypeVar("T")
TIMEOUT_ENV = "AQUA_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def launched() -> bool:
    """True when started by torchrun/accelerate with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None = None) -> DistContext | None:
    """Join the process group described by the launcher's environment (None for a single process)."""
    if not launched():
        return None
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except Exception as exc:
            raise AquaError(f"could not join the process group (rank {rank} of {world}, {backend}): {exc}") from exc
    return DistContext(rank, world, local_rank, backend)


def agree(ctx: DistContext | None, step: Callable[[], T], what: str) -> T:
    """Run ``step`` on every rank; if it fails on any rank, every rank raises (the failing one its own
    error, the others a one-line error naming the failed ranks)."""
    if ctx is None:
        return step()
    import torch.distributed as dist

    error: BaseException | None = None
    result = None
    try:
        result = step()
    except Exception as exc:  # re-raised below, after the others have been told
        error = exc
    flags = torch.zeros(ctx.world_size, dtype=torch.int32, device=ctx.device())
    flags[ctx.rank] = int(error is not None)
    dist.all_reduce(flags)
    if error is not None:
        raise error
    failed = [i for i, f in enumerate(flags.tolist()) if f]
    if failed:
        raise AquaError(f"{what} failed on rank {', '.join(map(str, failed))} (see that rank's error); nothing was written")
    return result  # type: ignore[return-value]


def shard(windows: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """This rank's windows: every ``world``-th, starting at ``rank``."""
    return windows if ctx is None else windows[ctx.rank :: ctx.world_size]


def all_reduce_sum(tensors: list[torch.Tensor], ctx: DistContext | None) -> float:
    """Sum ``tensors`` in place over all ranks; returns the seconds spent (0 for one process)."""
    if ctx is None:
        return 0.0
    import torch.distributed as dist

    if ctx.backend == "nccl":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for tensor in tensors:
        moved = tensor.to(ctx.device())
        dist.all_reduce(moved)
        tensor.copy_(moved)
    if ctx.backend == "nccl":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None:
        import torch.distributed as dist

        dist.barrier()


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group together: a rank that tears its group down while a peer is still
    inside a collective can make gloo abort that peer at exit (SIGABRT), failing a finished run."""
    if ctx is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
