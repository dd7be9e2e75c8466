"""GroupContext builds the batch's segments once per forward and every adapted layer of both towers reuses them."""

import copy

import pytest
import torch

from perpeft.engine.model.adapters import context as context_module
from perpeft.engine.model.adapters import ia3 as ia3_module
from perpeft.engine.model.adapters import lora as lora_module
from perpeft.engine.model.adapters.context import GroupContext
from perpeft.engine.model.encoders import GroupedClipEncoder
from perpeft.kernels.segments import GroupSegments

GROUPS = 3
# Items per group: 0 -> 2, 1 -> 1, 2 -> 2; group 2 comes first, so the sort order is not the identity.
ITEM_GROUPS = [2, 0, 1, 2, 0]
ADAPTED_LAYERS = {"lora": 2 * 2 * 2, "ia3": 2 * 2 * 3}  # towers x layers x targets (small CLIP)


def _inputs(bundle) -> tuple[torch.Tensor, ...]:
    input_ids, attention_mask = bundle.tokenizer([f"red golf bag {k}" for k in range(len(ITEM_GROUPS))])
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (len(ITEM_GROUPS), 3, 16, 16), generator=generator, dtype=torch.uint8)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask), pixels, torch.tensor(ITEM_GROUPS)


def _randomised(bundle, peft: str) -> GroupedClipEncoder:
    encoder = GroupedClipEncoder(copy.deepcopy(bundle), peft, GROUPS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in encoder.adapter_state().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return encoder.eval()


def test_segments_are_item_level_cached_per_group_count_and_reset_per_batch() -> None:
    context = GroupContext()
    context.set(torch.tensor(ITEM_GROUPS))
    segments = context.segments(GROUPS)
    assert segments is context.segments(GROUPS)
    assert segments.order.tolist() == [1, 4, 2, 0, 3]
    assert segments.counts.tolist() == [2, 1, 2]
    assert segments.offsets.tolist() == [0, 2, 3, 5]
    assert segments.rows_per_id(len(ITEM_GROUPS) * 7) == 7  # token rows of any tower
    assert context.segments(GROUPS + 1).num_groups == GROUPS + 1
    context.set(torch.tensor(ITEM_GROUPS))
    assert context.segments(GROUPS) is not segments
    context.clear()
    with pytest.raises(RuntimeError, match="no group ids set"):
        context.segments(GROUPS)


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_one_segmentation_per_forward_shared_by_every_adapted_layer(
    small_bundle, peft: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[GroupSegments] = []
    seen: list[tuple[int, GroupSegments]] = []

    segment_groups = context_module.segment_groups

    def counting_segment_groups(group_ids: torch.Tensor, num_groups: int) -> GroupSegments:
        built.append(segment_groups(group_ids, num_groups))
        return built[-1]

    monkeypatch.setattr(context_module, "segment_groups", counting_segment_groups)
    module, name = (lora_module, "grouped_lora") if peft == "lora" else (ia3_module, "grouped_ia3")
    op = getattr(module, name)

    def recording_op(x: torch.Tensor, *args, segments: GroupSegments) -> torch.Tensor:
        seen.append((x.shape[0], segments))
        return op(x, *args, segments=segments)

    monkeypatch.setattr(module, name, recording_op)
    encoder = _randomised(small_bundle, peft)
    inputs = _inputs(small_bundle)

    encoder(*inputs)
    assert len(built) == 1
    assert len(seen) == ADAPTED_LAYERS[peft]
    assert all(segments is built[0] for _, segments in seen)
    rows_per_item = {built[0].rows_per_id(rows) for rows, _ in seen}
    assert rows_per_item == {12, 5}  # text tokens, vision patches + CLS: both towers read the one object

    encoder(*inputs)
    assert len(built) == 2
    assert all(segments is built[1] for _, segments in seen[ADAPTED_LAYERS[peft] :])


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_output_and_gradients_unchanged_by_segments_on_the_triton_path(
    small_bundle, peft: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interpreted Triton kernels with the context's segments == the kernels sorting per call == PyTorch."""
    encoder = _randomised(small_bundle, peft)
    inputs = _inputs(small_bundle)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        encoder.zero_grad(set_to_none=True)
        out = encoder(*inputs)
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in encoder.adapter_state().values()]

    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    expected, expected_grads = run()
    monkeypatch.setenv("PERPEFT_KERNELS", "triton")
    with_segments, grads_with = run()
    module, name = (lora_module, "grouped_lora") if peft == "lora" else (ia3_module, "grouped_ia3")
    op = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, segments: op(*args))
    without_segments, grads_without = run()

    torch.testing.assert_close(with_segments, without_segments, rtol=0, atol=0)
    torch.testing.assert_close(with_segments, expected, rtol=1e-5, atol=1e-5)
    for mine, sorted_per_call, reference in zip(grads_with, grads_without, expected_grads, strict=True):
        torch.testing.assert_close(mine, sorted_per_call, rtol=0, atol=0)
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
