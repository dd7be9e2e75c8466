"""A training step never makes the host wait for the device: no scalar read, no data-dependent op, no copy
back and no blocking copy to the device, for every method and PEFT type, with the progress bars on.

Counted on the ``meta`` device, which stands in for CUDA (`benchmarks.device_traffic`); the end of an epoch
reads the loss once, so an epoch of one step and one of three steps must record the very same syncs.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.device_traffic import DEVICE, DeviceTraffic
from perpeft.engine.config.methods import METHODS
from perpeft.engine.data.sampler import TrainSampler
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import leave_one_out
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import load_run_inputs
from perpeft.engine.train.progress import TqdmBars
from perpeft.engine.train.stages import train_epoch

GROUPS = 2
CASES = [(name, "lora") for name in METHODS] + [
    (name, peft) for name in ("global-peft", "perpeft", "group-level-1") for peft in ("ia3", "iisan")
]


def _model_and_batches(config, groups: int) -> tuple[PerpeftModel, list]:
    dataset = run_dataset(config)
    inputs = load_run_inputs(config, dataset, progress=False)
    method = METHODS[config.method]
    assignment = np.arange(dataset.num_users + 1, dtype=np.int64) % GROUPS
    personal = {"user": np.arange(dataset.num_users + 1), "group": assignment}.get(method.personal)
    model = PerpeftModel(
        config,
        inputs.make_encoder,
        inputs.inputs,
        dataset.num_items,
        groups,
        None if personal is None else torch.from_numpy(personal),
    ).to(DEVICE)
    split = leave_one_out(dataset.sequences)
    sampler = TrainSampler(split.train, dataset.num_items, config.maxlen, 16, assignment if groups > 1 else None)
    return model, sampler.epoch(np.random.default_rng(0))


def _epoch_traffic(model: PerpeftModel, batches: list) -> DeviceTraffic:
    # Fused AdamW refuses meta tensors; the for-loop one runs there (the fused kernel is measured on CUDA).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    bars = TqdmBars()
    bars.stage_started("global", 1, 0)
    bars.epoch_started("global", 1, 1, len(batches))
    with DeviceTraffic() as traffic:
        train_epoch(model, optimizer, batches, DEVICE, bars)
    bars.stage_ended()
    return traffic


@pytest.mark.parametrize(("method", "peft"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_a_training_step_never_waits_for_the_device(method: str, peft: str, small_demo: Path, small_config) -> None:
    config = small_config(small_demo, method=method, peft=peft, groups=GROUPS)
    groups = GROUPS if METHODS[method].grouped_adapters else 1
    model, batches = _model_and_batches(config, groups)
    assert len(batches) >= 3
    one, three = _epoch_traffic(model, batches[:1]), _epoch_traffic(model, batches[:3])
    assert three.syncs == one.syncs, f"syncs per step: {three.syncs - one.syncs}"
    assert all("engine/train/stages.py" in site for site in three.syncs), three.syncs
    assert not three.blocking_copies, three.blocking_copies
    assert three.copies > one.copies > 0  # the steps' inputs did go to the device


def test_the_counter_sees_what_would_stall_a_gpu() -> None:
    host = torch.arange(4)
    with DeviceTraffic() as traffic:
        on_device = host.to(DEVICE)
        float(on_device.sum())
        on_device.cpu()
        host.to(DEVICE, non_blocking=True)
        with pytest.raises(AssertionError, match="nonzero"):
            on_device.nonzero()
    assert traffic.copies == 2 and traffic.copied_bytes == 2 * host.numel() * host.element_size()
    assert len(traffic.blocking_copies) == 1
    kinds = sorted(site.split(" at ")[0] for site in traffic.syncs)
    assert kinds == ["device-to-host copy", "nonzero", "scalar read"]
