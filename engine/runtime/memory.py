"""The process's CPU memory: glibc's malloc kept from returning freed memory to the kernel, and the peak
of a stretch of work (CUDA's max allocated bytes, or the peak RSS on CPU)."""

import ctypes
import platform
import resource
import sys
from pathlib import Path
from types import TracebackType

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
# mallopt's parameters (malloc.h) and what the engine sets them to: blocks up to 32 MiB (glibc's largest
# mmap threshold) from the heap, which grows 64 MiB beyond each need and keeps up to 1 GiB free at its top.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
HEAP_SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for the next allocation instead of returning them to the kernel
    (for this process, from now on); False where the C library is not glibc.

    A training step allocates and frees activations of a few MiB whose sizes change from step to step. By
    default glibc maps a block larger than any freed so far afresh, unmaps it when freed and trims the
    heap's free top, so steps fault their pages in again: 1,000–2,000 page faults and ~5 ms of system time
    a step of the benchmark job, against ~170 and ~0.4 ms with these settings. The cost: the heap keeps
    what it once held (the job's peak RSS 700–703 → 704–705 MiB)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = [mallopt(parameter, value) == 1 for parameter, value in HEAP_SETTINGS]  # each, even after a refusal
    return all(applied)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: writing 5 to clear_refs); False where that is not possible."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    """The process's peak RSS: ``VmHWM`` where /proc has it, else ``ru_maxrss``."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """``with PeakMemory(device) as peak: …`` then ``peak.bytes``: on CUDA the max allocated bytes inside
    the block; on CPU the peak RSS inside the block (``since_start`` False where the kernel cannot reset
    the mark, and the figure is then the process's lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.since_start = True

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.since_start = _reset_peak_rss()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = _peak_rss_bytes()
