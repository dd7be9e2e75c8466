"""Data parallelism on PyTorch's own stack: ``torchrun`` starts the processes, we join its process group.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; `join_process_group`
reads them (NCCL on CUDA, each rank on the GPU of its local rank; gloo on CPU) with a bounded timeout, so a
lost rank ends the others with an error instead of a hang. Everything else asks `current_world` — a single
process is a world of size 1, and every helper below is then the identity, so the engine has one code path
for both.

Ranks waiting for rank 0 to build a cache (`World.main_first`) wait on a second, gloo group with a long
timeout of its own (``$PERPEFT_BUILD_TIMEOUT``): a build may take hours, and on the main group NCCL's
watchdog would abort the waiting ranks after ``$PERPEFT_DIST_TIMEOUT``.

Data-parallel work is split in contiguous blocks (`World.block`) and put back together in rank order
(`World.gather_rows`), so a sharded pass computes exactly the batches a single process would.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from perpeft.engine.errors import InputError

TIMEOUT_ENV = "PERPEFT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600
BUILD_TIMEOUT_ENV = "PERPEFT_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT_S = 6 * 3600
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
        raised there and ends the other ranks with an error naming it, instead of leaving them waiting (and
        a failure of ``others()`` ends rank 0 and the rest so too).

        The ranks wait for each other on the waiting group (`_waiting_group`), whose timeout is
        ``$PERPEFT_BUILD_TIMEOUT``, not ``$PERPEFT_DIST_TIMEOUT``: building an Arts-scale image cache takes
        longer than a collective may."""
        if self.alone:
            return main()
        built = self._together(main if self.is_main else None)
        read = self._together(None if self.is_main else (others or main))
        return cast(Result, built if self.is_main else read)

    def _together(self, work: Callable[[], Result] | None) -> Result | None:
        """Run ``work`` on this rank (None: nothing), then wait on the waiting group until every rank has
        run its own: this rank's error is raised here, another rank's as a one-line `InputError` naming it."""
        result, error = None, None
        if work is not None:
            try:
                result = work()
            except Exception as caught:
                error = caught
        failed = torch.zeros(self.size)  # on the CPU: the gloo group carries no CUDA tensor
        failed[self.rank] = float(error is not None)
        dist.all_reduce(failed, group=_waiting_group())
        if error is not None:
            raise error
        if failed.any():
            culprit = int(failed.nonzero()[0, 0])
            raise InputError(f"rank {self.rank}: stopping because rank {culprit} failed (its error is in its output)")
        return result

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


def _timeout(variable: str, default: float) -> timedelta:
    value = os.environ.get(variable, "")
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise InputError(f"${variable}={value}: not a number of seconds") from None
    return timedelta(seconds=seconds)


class _WaitingGroup:
    """The gloo group `World.main_first` waits on, and the default group it was made for."""

    world: object = None
    group: "dist.ProcessGroup | None" = None


def _waiting_group() -> "dist.ProcessGroup":
    """A gloo group of every rank whose collectives time out after ``$PERPEFT_BUILD_TIMEOUT`` seconds
    (default 6 hours): what ranks wait on while another builds a cache. Gloo has no watchdog, and it only
    ever carries a flag per rank on the CPU, so it serves NCCL runs as well. Made once per process group
    (by `join_process_group`, or here on first use: every rank gets here at the same point)."""
    if _WaitingGroup.group is None or _WaitingGroup.world is not dist.group.WORLD:
        timeout = _timeout(BUILD_TIMEOUT_ENV, DEFAULT_BUILD_TIMEOUT_S)
        _WaitingGroup.group = dist.new_group(backend="gloo", timeout=timeout)
        _WaitingGroup.world = dist.group.WORLD
    return _WaitingGroup.group


def rank_gpu(device: str, environ: Mapping[str, str] = os.environ) -> int:
    """The GPU a rank launched by ``torchrun`` uses when the run's ``device`` is CUDA: the one of its local
    rank. ``--device cuda:N`` would put every rank of a machine on GPU N while NCCL gives each its own, so
    it is refused when a machine runs several ranks (``$LOCAL_WORLD_SIZE``, or ``$WORLD_SIZE`` when unset),
    and names that GPU for the one rank of a machine otherwise."""
    try:
        index = torch.device(device).index if device.startswith("cuda") else None
    except RuntimeError:
        index = None  # not a device name: resolve_device reports it
    if index is None:
        return int(environ.get("LOCAL_RANK", 0))
    ranks_here = int(environ.get("LOCAL_WORLD_SIZE", environ.get("WORLD_SIZE", 1)))
    if ranks_here > 1:
        raise InputError(
            f"--device {device} under torchrun: each of the {ranks_here} ranks on this machine uses the GPU "
            "of its local rank; pass --device cuda or auto (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    return index


def join_process_group(device: str) -> World:
    """Join the launcher's process group: NCCL when the run's device is CUDA (each rank on the GPU of its
    local rank, `rank_gpu`), else gloo. ``$PERPEFT_DIST_TIMEOUT`` (seconds, default 600) bounds every
    collective, so a dead rank surfaces as an error on the others; waiting for a cache build is bounded
    by ``$PERPEFT_BUILD_TIMEOUT`` instead (`World.main_first`)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current_world()
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    gpu = rank_gpu(device) if cuda else None
    timeout = _timeout(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    _timeout(BUILD_TIMEOUT_ENV, DEFAULT_BUILD_TIMEOUT_S)  # a malformed value stops every rank before it joins
    if gpu is not None:
        torch.cuda.set_device(gpu)  # a plain "cuda" device (resolve_device) is then this GPU
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    world = current_world()
    if world.size > 1:
        _waiting_group()  # made now, while every rank is here
    return world


def leave_process_group() -> None:
    """Destroy the process group at the end of a command (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # the waiting group with it
    _WaitingGroup.world = _WaitingGroup.group = None
