"""Peak memory of a stretch of work: CUDA's max allocated bytes, or the process's peak RSS on CPU."""

import resource
import sys
from pathlib import Path
from types import TracebackType

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


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
