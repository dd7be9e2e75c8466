"""The dispatch: which path each op takes under PERPEFT_KERNELS, and the segment metadata it accepts."""

import os
import subprocess
import sys

import pytest
import torch

from perpeft.kernels._triton import recorded_launches
from perpeft.kernels.ops import bce_with_negatives, grouped_ia3, grouped_lora, kernel_backend
from perpeft.kernels.segments import segment_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_launched() -> list[str]:
    """The Triton kernels (sorted by name) that one call of each op on small inputs launches, forward and
    backward: none when the references ran."""
    x = torch.randn(4, 16, requires_grad=True)
    ids = torch.tensor([1, 0, 1, 1])
    with recorded_launches(programs=8) as launches:
        outs = [
            grouped_lora(x, torch.randn(2, 4, 16), torch.randn(2, 8, 4), ids, 2.0),
            grouped_ia3(x, torch.randn(2, 16), ids),
            bce_with_negatives(x, torch.randn(4, 16), torch.randn(4, 16), ids.bool()),
        ]
        sum(out.sum() for out in outs).backward()
    return sorted(launch.kernel.fn.__name__ for launch in launches)


def test_auto_takes_the_reference_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", "auto")
    assert kernel_backend(torch.zeros(1)) == "torch"
    assert _kernels_launched() == []


def test_auto_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERPEFT_KERNELS")
    assert kernel_backend(torch.zeros(1)) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_takes_triton_for_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", "auto")
    assert kernel_backend(torch.zeros(1, device="cuda")) == "triton"


def test_torch_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    assert kernel_backend(torch.zeros(1, device=DEVICE)) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter serves CPU tensors only without CUDA")
def test_triton_runs_cpu_tensors_in_the_interpreter() -> None:
    assert kernel_backend(torch.zeros(1)) == "triton"
    kernels = ["_bce_kernel", *["_expand_kernel", "_scale_rows_kernel", "_shrink_kernel"] * 2]
    assert _kernels_launched() == sorted(kernels)  # dx only: LoRA's backward shrinks and expands


@pytest.mark.parametrize("value", ["cuda", "TRITON!", "reference"])
def test_unknown_value_is_an_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", value)
    with pytest.raises(ValueError, match="PERPEFT_KERNELS"):
        grouped_ia3(torch.ones(2, 3), torch.ones(1, 3), torch.zeros(2, dtype=torch.long))


def test_values_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", " Torch ")
    assert kernel_backend(torch.zeros(1)) == "torch"


def test_segments_sort_stably_and_count_empty_groups() -> None:
    segments = segment_groups(torch.tensor([2, 0, 2, 3, 0]), 5)
    assert segments.order.tolist() == [1, 4, 0, 2, 3]
    assert segments.counts.tolist() == [2, 0, 2, 1, 0]
    assert segments.offsets.tolist() == [0, 2, 2, 4, 5, 5]
    assert segments.rows_per_id(15) == 3
    with pytest.raises(ValueError, match="evenly"):
        segments.rows_per_id(7)


def test_importing_the_kernels_leaves_the_process_environment_alone() -> None:
    """Without CUDA the kernels are decorated in interpreter mode, but TRITON_INTERPRET is set only while they
    are: other Triton users in the process see the environment unchanged."""
    code = (
        "import os, torch\n"
        "from perpeft.kernels import bce, ia3, lora\n"
        "assert 'TRITON_INTERPRET' not in os.environ, os.environ['TRITON_INTERPRET']\n"
        "assert type(lora._shrink_kernel).__name__ == ('JITFunction' if torch.cuda.is_available() else 'InterpretedFunction')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
