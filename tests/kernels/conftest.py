"""Kernel tests run the Triton kernels: on CPU-only machines through Triton's interpreter."""

from collections.abc import Callable

import pytest
import torch


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
