"""Host syncs and host↔device copies of a piece of engine code, counted without a GPU.

The code runs with its model on PyTorch's ``meta`` device, which stands in for an accelerator: tensors
there have shapes but no data, so every op that would make a CUDA host wait for the device shows up in
a dispatch mode as what it is — a scalar read (``.item()``, ``float()``, ``int()``, ``bool()``), an op
whose output size depends on the data (``nonzero``, ``unique``, boolean masks), a copy from the device
to the host, or a host-to-device copy that blocks (``non_blocking=False``). Host-to-device copies are
also counted in bytes. Scalar reads and device-to-host copies are answered with zeros so the code runs
on; a data-dependent op cannot be answered and raises.

What the meta device cannot show: whether a host tensor was pinned (`to_device` pins on CUDA only), and
syncs inside CUDA libraries or Triton launches; the GPU check's ``sync`` step measures those.
"""

import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("meta")
aten = torch.ops.aten
_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.masked_select.default,
    aten.repeat_interleave.Tensor,
}
_ROOT = str(Path(__file__).resolve().parents[1])


def _site() -> str:
    """The innermost frame of this repository outside this file: where the op was called from."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.filename.startswith(_ROOT) and not frame.filename.endswith("device_traffic.py"):
            return f"{Path(frame.filename).relative_to(_ROOT)}:{frame.lineno} {frame.line}"
    return "outside the repository"


def _on_device(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.device == DEVICE


@dataclass
class DeviceTraffic(TorchDispatchMode):
    """Records, while active, what would stall a CUDA host: ``syncs`` (kind and call site → count) and
    host-to-device copies (``copies``, ``copied_bytes``, and ``blocking_copies`` by call site)."""

    syncs: Counter = field(default_factory=Counter)
    blocking_copies: Counter = field(default_factory=Counter)
    copies: int = 0
    copied_bytes: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and _on_device(args[0]):
            self.syncs[f"scalar read at {_site()}"] += 1
            return 0
        if func in _DATA_DEPENDENT and any(_on_device(value) for value in args):
            site = _site()
            self.syncs[f"{func.overloadpacket.__name__} at {site}"] += 1
            raise AssertionError(f"data-dependent {func} on the device at {site}")
        if func is aten.index.Tensor and any(
            _on_device(index) and index.dtype == torch.bool for index in args[1] if index is not None
        ):
            self.syncs[f"boolean index at {_site()}"] += 1
            raise AssertionError(f"boolean index on the device at {_site()}")
        if func is aten._to_copy.default:
            source, target = args[0], kwargs.get("device", args[0].device)
            if _on_device(source) and torch.device(target).type == "cpu":
                self.syncs[f"device-to-host copy at {_site()}"] += 1
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
            if source.device.type == "cpu" and torch.device(target) == DEVICE:
                self._host_to_device(source, kwargs.get("non_blocking", False))
        if func is aten.copy_.default:
            target, source = args[0], args[1]
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            if _on_device(source) and target.device.type == "cpu":
                if not non_blocking:
                    self.syncs[f"device-to-host copy at {_site()}"] += 1
                return target
            if source.device.type == "cpu" and _on_device(target):
                self._host_to_device(source, non_blocking)
        return func(*args, **kwargs)

    def _host_to_device(self, source: torch.Tensor, non_blocking: bool) -> None:
        self.copies += 1
        self.copied_bytes += source.numel() * source.element_size()
        if not non_blocking:
            self.blocking_copies[_site()] += 1
