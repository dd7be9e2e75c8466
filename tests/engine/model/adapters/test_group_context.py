"""GroupContext builds the batch's segments once per forward and every adapted layer of both towers reuses them."""

import copy

import pytest
import torch

from perpeft.engine.clip.pooled import title_rows
from perpeft.engine.model import groups as groups_module
from perpeft.engine.model.adapters import ia3 as ia3_module
from perpeft.engine.model.adapters import lora as lora_module
from perpeft.engine.model.adapters.context import GroupContext
from perpeft.engine.model.encoders import GroupedClipEncoder
from perpeft.engine.model.groups import RowGroups
from perpeft.kernels.segments import GroupSegments

CPU = torch.device("cpu")
GROUPS = 3
# Items per group: 0 -> 2, 1 -> 1, 2 -> 2; group 2 comes first, so the sort order is not the identity.
ITEM_GROUPS = [2, 0, 1, 2, 0]
ADAPTED_LAYERS = {"lora": 2 * 2 * 2, "ia3": 2 * 2 * 3}  # towers x layers x targets (small CLIP)
# Grouped-op calls per forward on the CPU: each tower's last LoRA v_proj mixes its rank-space rows instead
# (the folded pooled layer, `engine.clip.pooled._folded_layer`).
OP_CALLS = {"lora": ADAPTED_LAYERS["lora"] - 2, "ia3": ADAPTED_LAYERS["ia3"]}


def _groups(item_groups: list[int] = ITEM_GROUPS) -> RowGroups:
    return RowGroups.per_row(torch.tensor(item_groups), GROUPS, CPU)


def _inputs(bundle) -> tuple[torch.Tensor | RowGroups, ...]:
    input_ids, attention_mask = bundle.tokenizer([f"red golf bag {k}" for k in range(len(ITEM_GROUPS))])
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (len(ITEM_GROUPS), 3, 16, 16), generator=generator, dtype=torch.uint8)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask), pixels, _groups()


def _randomised(bundle, peft: str) -> GroupedClipEncoder:
    encoder = GroupedClipEncoder(copy.deepcopy(bundle), peft, GROUPS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in encoder.adapter_state().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return encoder.eval()


def test_segments_are_item_level_built_once_per_batch_and_reset_per_batch() -> None:
    context = GroupContext()
    groups = _groups()
    context.set(groups)
    tokens = torch.zeros(len(ITEM_GROUPS), 7, 2)
    segments = context.segments(GROUPS, tokens)
    assert segments is groups.segments
    assert segments is context.segments(GROUPS, tokens[:, 0])
    assert segments.order.tolist() == [1, 4, 2, 0, 3]
    assert segments.counts.tolist() == [2, 1, 2]
    assert segments.offsets.tolist() == [0, 2, 3, 5]
    assert segments.rows_per_id(len(ITEM_GROUPS) * 7) == 7  # token rows of any tower
    assert segments.num_groups == GROUPS
    with pytest.raises(ValueError, match=f"adapter of {GROUPS + 1} groups got a batch of {GROUPS} groups"):
        context.segments(GROUPS + 1, tokens)
    with pytest.raises(ValueError, match=f"adapter of {GROUPS + 1} groups"):
        context.row_groups(torch.zeros(len(ITEM_GROUPS), 4, 2), GROUPS + 1)
    context.set(_groups())
    assert context.segments(GROUPS, tokens) is not segments
    context.clear()
    with pytest.raises(RuntimeError, match="no groups set"):
        context.shared_group(GROUPS)
    with pytest.raises(RuntimeError, match="no groups set"):
        context.segments(GROUPS, tokens)


def test_packed_token_rows_take_each_items_group_by_its_length() -> None:
    context = GroupContext()
    context.set(_groups())
    lengths = torch.tensor([3, 1, 2, 4, 2])
    packed = torch.zeros(int(lengths.sum()), 8)
    with context.packed(lengths):
        ids = context.row_groups(packed, GROUPS)
        assert ids.tolist() == [2, 2, 2, 0, 1, 1, 2, 2, 2, 2, 0, 0]
        assert context.segments(GROUPS, packed) is None  # the op segments the rows itself
        per_item = torch.zeros(len(ITEM_GROUPS), 1, 8)  # the pooled position: one row per item
        assert context.row_groups(per_item, GROUPS).tolist() == ITEM_GROUPS
        assert context.segments(GROUPS, per_item) is context.segments(GROUPS, per_item[:, 0])
        with pytest.raises(ValueError, match="adapter of 4 groups"):
            context.row_groups(packed, GROUPS + 1)
    assert context.row_groups(torch.zeros(len(ITEM_GROUPS), 8), GROUPS).tolist() == ITEM_GROUPS
    assert context.segments(GROUPS, packed) is not None
    with context.packed(None):
        assert context.segments(GROUPS, packed) is not None
    with pytest.raises(ValueError, match="5 items but packed lengths"), context.packed(lengths[:2]):
        pass
    context.clear()
    with pytest.raises(RuntimeError, match="no groups set"), context.packed(lengths):
        pass


def test_row_groups_repeat_each_items_group_per_token_and_are_cached_per_length() -> None:
    context = GroupContext()
    context.set(_groups())
    text = context.row_groups(torch.zeros(len(ITEM_GROUPS), 3, 8), GROUPS)
    assert text.tolist() == [group for group in ITEM_GROUPS for _ in range(3)]
    assert context.row_groups(torch.zeros(len(ITEM_GROUPS), 3, 2), GROUPS) is text
    assert context.row_groups(torch.zeros(len(ITEM_GROUPS), 8), GROUPS).tolist() == ITEM_GROUPS
    context.set(_groups())
    assert context.row_groups(torch.zeros(len(ITEM_GROUPS), 3, 8), GROUPS) is not text


def test_row_groups_know_the_single_group_on_the_host() -> None:
    assert RowGroups.per_row(torch.tensor([1, 1, 1]), GROUPS, CPU).single == 1
    assert RowGroups.per_row(torch.tensor(ITEM_GROUPS), GROUPS, CPU).single is None
    assert RowGroups.per_row(torch.zeros(4, dtype=torch.long), 1, CPU).single == 0
    one = RowGroups.one(2, 4, GROUPS, CPU)
    assert (one.single, one.rows, one.host.tolist(), one.ids.tolist()) == (2, 4, [2] * 4, [2] * 4)
    assert RowGroups.of(2, 4, GROUPS, CPU).single == 2
    assert RowGroups.of(torch.tensor(ITEM_GROUPS), 5, GROUPS, CPU).host.tolist() == ITEM_GROUPS
    mixed = _groups()
    assert mixed.take(torch.tensor([0, 3])).single == 2  # a homogeneous subset knows its group
    assert mixed.take(torch.tensor([1, 2])).host.tolist() == [0, 1]
    with pytest.raises(ValueError, match="host"):
        RowGroups.per_row(torch.tensor(ITEM_GROUPS, device="meta"), GROUPS, CPU)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        RowGroups.per_row(torch.tensor([0, 3]), GROUPS, CPU)
    with pytest.raises(ValueError, match="5 rows"):
        RowGroups.of(torch.tensor([0, 1]), 5, GROUPS, CPU)


def test_shared_group_is_the_batchs_single_group_known_on_the_host() -> None:
    context = GroupContext()
    context.set(_groups())
    assert context.shared_group(GROUPS) is None
    context.set(_groups([1, 1, 1]))
    assert context.shared_group(GROUPS) == 1
    context.set(RowGroups.one(2, 4, GROUPS, CPU))
    assert context.shared_group(GROUPS) == 2


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_one_segmentation_per_forward_shared_by_every_adapted_layer(
    small_bundle, peft: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[GroupSegments] = []
    seen: list[tuple[int, GroupSegments]] = []

    segment_groups = groups_module.segment_groups

    def counting_segment_groups(group_ids: torch.Tensor, num_groups: int) -> GroupSegments:
        built.append(segment_groups(group_ids, num_groups))
        return built[-1]

    monkeypatch.setattr(groups_module, "segment_groups", counting_segment_groups)
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
    assert len(seen) == OP_CALLS[peft]
    # Packed title rows (on the CPU) have none: the op segments them; every other call gets the one object.
    packed_rows = int(title_rows(inputs[0], inputs[1], encoder.clip.config.text_config.eos_token_id).lengths.sum())
    assert {rows for rows, segments in seen if segments is None} == {packed_rows}
    assert all(segments is built[0] for _, segments in seen if segments is not None)
    rows_per_item = {built[0].rows_per_id(rows) for rows, segments in seen if segments is not None}
    # Vision patches + CLS, and one row per item (the last layer's pooled position).
    assert rows_per_item == {5, 1}

    encoder(*inputs[:3], _groups())  # the next batch: its own groups, segmented once
    assert len(built) == 2
    assert len(seen) == 2 * OP_CALLS[peft]
    assert all(segments in (built[1], None) for _, segments in seen[OP_CALLS[peft] :])


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
