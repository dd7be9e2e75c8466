"""Device policy: precision follows the device a model runs on now; SASRec compiles on CUDA only by default."""

import pytest
import torch

from perpeft.engine.runtime.device import compiles_sasrec, resolve_device, uses_bf16_autocast

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("precision", "device", "expected"),
    [("auto", CUDA, True), ("bf16", CUDA, True), ("fp32", CUDA, False), ("auto", CPU, False), ("bf16", CPU, False)],
)
def test_bf16_autocast_is_decided_by_the_current_device(precision: str, device: torch.device, expected: bool) -> None:
    assert uses_bf16_autocast(precision, device) is expected


def test_sasrec_compiles_on_cuda_unless_told_otherwise() -> None:
    assert [compiles_sasrec(setting, CUDA) for setting in ("auto", "on", "off")] == [True, True, False]
    assert [compiles_sasrec(setting, CPU) for setting in ("auto", "on", "off")] == [False, True, False]


def test_auto_device_is_cuda_only_when_present() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
