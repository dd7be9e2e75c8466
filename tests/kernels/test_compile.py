"""Every kernel compiled for sm_80 and sm_90 (no GPU needed) at the engine's ViT-B/32 launches: no
spill, at least 25% occupancy. See :mod:`perpeft.kernels.resources`; the table is in benchmarks/RESULTS.md."""

import pytest
import torch

from perpeft.kernels import resources
from perpeft.kernels._triton import recorded_launches, target_programs
from perpeft.kernels.ops import grouped_ia3

KERNELS = {
    "_shrink_kernel",
    "_expand_kernel",
    "_segment_outer_kernel",
    "_scale_rows_kernel",
    "_backward_kernel",
    "_bce_kernel",
}
MIN_WARPS_PER_SM = 16  # 25% of the 64 an SM holds on sm_80 and sm_90


@pytest.fixture(scope="module")
def binaries() -> list[resources.Binary]:
    return resources.measure()


def test_every_kernel_is_compiled_for_both_targets(binaries: list[resources.Binary]) -> None:
    for target in resources.TARGETS:
        assert {b.kernel for b in binaries if b.target == target} == KERNELS


def test_no_kernel_spills(binaries: list[resources.Binary]) -> None:
    spilling = [b for b in binaries if b.stack_bytes or b.local_bytes]
    assert not spilling, "\n".join(f"{b.target} {b.kernel} {b.config}: {b.cases[0]}" for b in spilling)


def test_every_kernel_reaches_a_quarter_occupancy(binaries: list[resources.Binary]) -> None:
    low = [b for b in binaries if b.warps_per_sm < MIN_WARPS_PER_SM]
    assert not low, "\n".join(f"{b.target} {b.kernel} {b.config}: {b.registers} registers" for b in low)


@pytest.mark.parametrize(
    ("registers", "shared", "warps", "blocks"),
    [
        (255, 0, 4, 2),  # 8,192 registers a warp: 2 warps per bank
        (128, 0, 4, 4),
        (130, 0, 4, 3),  # rounded up to 136 a thread
        (64, 0, 8, 4),  # 8 warps take two from each bank
        (16, 0, 4, 16),  # the warp limit
        (16, 0, 1, 32),  # the block limit
        (32, 40 * 1024, 4, 4),  # shared memory: 164 KB over 41 KB blocks
    ],
)
def test_blocks_per_sm(registers: int, shared: int, warps: int, blocks: int) -> None:
    assert resources.blocks_per_sm(resources.TARGETS["sm_80"], registers, shared, warps) == blocks


def test_recorded_launches_run_nothing_and_size_for_the_target() -> None:
    x, scales, ids = torch.ones(4, 8), torch.ones(2, 8), torch.tensor([0, 1, 1, 0])
    with recorded_launches(programs=528) as launches:
        assert target_programs(x.device) == 528
        out = grouped_ia3(x, scales, ids)
    assert [launch.kernel.fn.__name__ for launch in launches] == ["_scale_rows_kernel"]
    assert launches[0].grid == (1, 1)
    assert target_programs(x.device) == 8
    assert out.shape == x.shape
