"""Kernel tests run the Triton kernels: compiled on CUDA tensors where a GPU is present (each test file
picks ``cuda`` then), through Triton's interpreter on CPU tensors without one.

``PERPEFT_KERNEL_TESTS_DEVICE=cuda`` (set by ``benchmarks/gpu_check.sh``) demands the compiled path: the
session stops with an error when CUDA is missing or Triton runs interpreted (``TRITON_INTERPRET=1``),
so a GPU check cannot pass on interpreted kernels. The mode is printed in pytest's header and recorded
as a JUnit suite property (``kernel_mode``) for the check's report.
"""

import os
from collections.abc import Callable

import pytest
import torch

REQUIRED_DEVICE = "PERPEFT_KERNEL_TESTS_DEVICE"


def kernel_mode() -> str:
    """How the Triton kernels run in this session: compiled on which GPU, or interpreted on the CPU."""
    from perpeft.kernels._triton import INTERPRETED, triton

    if INTERPRETED:
        return f"Triton {triton.__version__} interpreted, CPU tensors"
    return f"Triton {triton.__version__} compiled, CUDA tensors on {torch.cuda.get_device_name()}"


def pytest_report_header() -> str:
    return f"perpeft kernels: {kernel_mode()}"


@pytest.fixture(autouse=True, scope="session")
def required_kernel_mode(record_testsuite_property: Callable[[str, object], None]) -> None:
    """Stop the session when ``PERPEFT_KERNEL_TESTS_DEVICE=cuda`` asks for compiled kernels it cannot have."""
    mode = kernel_mode()
    record_testsuite_property("kernel_mode", mode)
    required = os.environ.get(REQUIRED_DEVICE, "")
    if required == "cuda" and (not torch.cuda.is_available() or "interpreted" in mode):
        pytest.exit(f"{REQUIRED_DEVICE}=cuda, but the kernels run {mode}", returncode=3)
    elif required not in ("", "cuda"):
        pytest.exit(f"{REQUIRED_DEVICE}={required!r}: expected 'cuda' or unset", returncode=3)


@pytest.fixture(autouse=True)
def triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the Triton path, so plain ``pytest`` exercises the kernels (interpreted without a GPU)."""
    monkeypatch.setenv("PERPEFT_KERNELS", "triton")


@pytest.fixture
def assert_close() -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], None]:
    """Compare a kernel result (in ``dtype``) with an fp32 reference: tight for fp32, loose for bf16."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        assert actual.dtype == dtype
        scale = max(1.0, expected.abs().max().item())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * scale)

    return check


@pytest.fixture
def strided() -> Callable[[torch.Tensor], torch.Tensor]:
    """``t``'s values as a non-contiguous view (a leaf's, so it takes gradients): the last two dims transposed
    in memory and every other row of that memory skipped, so no stride is 1 (1-D: every other element)."""

    def view(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1:
            spread = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device)
            spread[::2] = t
            return spread.requires_grad_(t.is_floating_point())[::2]
        spread = torch.zeros(*t.shape[:-2], 2 * t.shape[-1], t.shape[-2], dtype=t.dtype, device=t.device)
        spread[..., ::2, :] = t.transpose(-1, -2)
        return spread.requires_grad_(t.is_floating_point())[..., ::2, :].transpose(-1, -2)

    return view
