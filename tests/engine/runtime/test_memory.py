"""`reuse_freed_memory`: freed blocks come back without page faults (glibc's default faults them in again)."""

import platform
import subprocess
import sys

import pytest

ROUNDS = """
import resource, sys, torch
from perpeft.engine.runtime.memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def step(kib):  # a training step's pattern: blocks of a size that varies from step to step, written, freed
    blocks = [torch.ones(kib << 8) for _ in range(50)]
    del blocks
step(1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for kib in range(1088, 1536, 64):
    step(kib)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = sum(50 * kib // 4 for kib in range(1088, 1536, 64))  # pages the measured steps write


def page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    # glibc by default maps each block larger than any freed so far afresh: every such step faults again
    assert page_faults("default") > PAGES // 2
    assert page_faults("reuse") < PAGES // 8
