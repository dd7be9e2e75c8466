"""Device policy: precision follows the device a model runs on now; SASRec compiles on CUDA only by default."""

import pytest
import torch

from benchmarks.device_traffic import DEVICE, DeviceTraffic
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.device import compiles_sasrec, resolve_device, to_device, uses_bf16_autocast

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


def test_a_stored_numbered_gpu_is_checked_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    # A run trained with --device cuda:1, then resumed or embedded by torchrun: the stored device meets the ranks.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(InputError, match="--device cuda:1 under torchrun"):
        resolve_device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")


def test_host_tensors_reach_other_devices_without_a_blocking_copy() -> None:
    with DeviceTraffic() as traffic:
        on_device = to_device(torch.arange(3), DEVICE)
    assert on_device.device == DEVICE and traffic.copies == 1 and not traffic.blocking_copies
    host = torch.arange(3)
    assert to_device(host, CPU) is host
