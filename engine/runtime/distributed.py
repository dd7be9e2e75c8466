"""Data parallelism on PyTorch's own stack: ``torchrun`` starts the processes, we join its process group.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; `join_process_group`
reads them (NCCL on CUDA, gloo on CPU) with a bounded timeout, so a lost rank ends the others with an error
instead of a hang. Everything else asks `current_world` — a single process is a world of size 1, and every
helper below is then the identity, so the engine has one code path for both.

Data-parallel work is split in contiguous blocks (`World.block`) and put back together in rank order
(`World.gather_rows`), so a sharded pass computes exactly the batches a single process would.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from perpeft.engine.errors import InputError

TIMEOUT_ENV = "PERPEFT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600
Result = TypeVar("Result")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def joined(self) -> bool:
        """Whether a process group exists (also for ``torchrun --nproc-per-node 1``)."""
        return dist.is_available() and dist.is_initialized()

    @property
    def alone(self) -> bool:
        """No other rank to talk to: every collective below is then the identity."""
        return not self.joined or self.size == 1

    def block(self, count: int) -> range:
        """This rank's contiguous share of ``count`` work units (sizes differ by at most one)."""
        return range(count * self.rank // self.size, count * (self.rank + 1) // self.size)

    def block_slice(self, count: int) -> slice:
        """`block` as a slice, to index arrays and tensors."""
        mine = self.block(count)
        return slice(mine.start, mine.stop)

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``[n_r, ...]`` rows concatenated in rank order, on every rank (sizes may differ)."""
        if self.alone:
            return rows
        device = self._device()
        local = rows.to(device)
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=device))
        longest = int(max(size.item() for size in sizes))
        padded = local.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes, strict=True)]).to(rows.device)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``values`` over the ranks."""
        if self.alone:
            return values
        total = values.to(self._device())
        dist.all_reduce(total)
        return total.to(values.device)

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``values`` (same shape and dtype on every rank) on every rank."""
        if self.alone:
            return values
        shared = values.to(self._device())
        dist.broadcast(shared, src=0)
        return shared.to(values.device)

    def main_first(self, main: Callable[[], Result], others: Callable[[], Result] | None = None) -> Result:
        """``main()`` on rank 0, then — once it succeeded — ``others()`` (default ``main``) on the other ranks:
        for work that fills a cache or creates a directory the others then read. A failure on rank 0 is
        raised there and ends the other ranks with an error naming it, instead of leaving them waiting."""
        if self.alone:
            return main()
        result, error = None, None
        if self.is_main:
            try:
                result = main()
            except Exception as caught:
                error = caught
        failed = bool(self.broadcast(torch.tensor([int(error is not None)])).item())
        if self.is_main:
            if error is not None:
                raise error
            return result
        if failed:
            raise InputError(f"rank {self.rank}: stopping because rank 0 failed (its error is in its output)")
        return (others or main)()

    def barrier(self) -> None:
        """Wait until every rank gets here (after rank 0 wrote what the others read next)."""
        if not self.alone:
            dist.barrier()


def current_world() -> World:
    """The process group this process joined, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` (or an equivalent launcher) started this process as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_process_group(device: str) -> World:
    """Join the launcher's process group: NCCL when the run's device is CUDA, else gloo. ``$PERPEFT_DIST_TIMEOUT``
    (seconds, default 600) bounds every collective, so a dead rank surfaces as an error on the others."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current_world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return current_world()


def leave_process_group() -> None:
    """Destroy the process group at the end of a command (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
