"""Model pieces pinned to the paper's numbers: shapes, parameter counts, formulas (App. C.2, Table 8)."""

import math

import pytest
import torch

from perpeft.engine.model import recommender as recommender_module
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.params import parameter_counts
from perpeft.engine.model.recommender import GroupedProjector, Recommender, SASRec

CPU = torch.device("cpu")


def test_sasrec_parameter_count_and_shapes():
    recommender = Recommender(num_items=18884, groups=1, multimodal_dim=1024)
    assert sum(p.numel() for p in recommender.sasrec.parameters()) == 12_992
    assert sum(p.numel() for p in recommender.projector.parameters()) == 67_872
    transductive = recommender.item_embeddings.weight.numel() + recommender.position_embeddings.weight.numel()
    assert transductive == (18884 + 1) * 32 + 11 * 32 == 604_672
    items = torch.tensor([[0, 0, 0, 5, 9, 2, 7, 1, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    output = recommender.eval().sequence_output(items, torch.randn(2, 10, 32))
    assert output.shape == (2, 10, 32)


def test_embeddings_padding_rows_are_zero_after_xavier_init():
    recommender = Recommender(num_items=50, groups=2, multimodal_dim=16)
    assert torch.count_nonzero(recommender.item_embeddings.weight[0]) == 0
    assert torch.count_nonzero(recommender.position_embeddings.weight[0]) == 0


def test_item_vector_is_half_multimodal_plus_id_and_padding_is_zero():
    recommender = Recommender(num_items=20, groups=2, multimodal_dim=16)
    items = torch.tensor([0, 3, 7])
    multimodal = torch.randn(3, 16)
    groups = RowGroups.per_row(torch.tensor([1, 1, 0]), 2, CPU)
    z = recommender.item_vectors(items, multimodal, groups)
    expected = 0.5 * recommender.projector(multimodal, groups) + recommender.item_embeddings(items)
    torch.testing.assert_close(z[1:], expected[1:])
    assert torch.count_nonzero(z[0]) == 0


def test_sequence_input_is_scaled_by_sqrt_d_and_positions_skip_padding():
    recommender = Recommender(num_items=20, groups=1, multimodal_dim=None, dropout=0.0).eval()
    seen = {}
    recommender.sasrec.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    items = torch.tensor([[0, 0, 4, 5]])
    vectors = torch.randn(1, 4, 32)
    recommender.sequence_output(items, vectors)
    positions = recommender.position_embeddings(torch.tensor([[0, 0, 3, 4]]))
    torch.testing.assert_close(seen["x"], vectors * math.sqrt(32) + positions)


def one_group_of(projector: GroupedProjector, group: int) -> GroupedProjector:
    """A one-group projector holding ``group``'s weights of ``projector``."""
    single = GroupedProjector(1, projector.w1.shape[2], projector.w1.shape[1], projector.w2.shape[1])
    with torch.no_grad():
        for parameter, source in zip(single.parameters(), projector.parameters(), strict=True):
            parameter.copy_(source[group : group + 1])
    return single


def test_grouped_projector_rows_use_their_own_group():
    projector = GroupedProjector(groups=3, in_features=16, hidden=8, out_features=4)
    x = torch.randn(6, 16)
    groups = torch.tensor([2, 0, 1, 1, 2, 0])
    mixed = projector(x, RowGroups.per_row(groups, 3, CPU))
    for group in range(3):
        single = one_group_of(projector, group)
        rows = groups == group
        alone = single(x[rows], RowGroups.one(0, int(rows.sum()), 1, CPU))
        torch.testing.assert_close(mixed[rows], alone)
        # The single-group path of the 3-group projector gives the same rows.
        torch.testing.assert_close(projector(x[rows], RowGroups.one(group, int(rows.sum()), 3, CPU)), alone)


def test_grouped_projector_gradients_equal_each_groups_own_and_repeat_bitwise():
    """Mixed-group gradients are each group's single-projector gradients, and (one-hot GEMMs, no scatter-add)
    identical from one backward to the next on a multi-threaded CPU."""
    torch.manual_seed(0)
    projector = GroupedProjector(groups=4, in_features=64, hidden=64, out_features=32)
    x = torch.randn(4096, 64)
    groups = torch.randint(0, 4, (4096,))
    weights = torch.randn(4096, 32)

    def gradients(model: GroupedProjector, rows: torch.Tensor, ids: RowGroups) -> list[torch.Tensor]:
        model.zero_grad()
        (model(x[rows], ids) * weights[rows]).sum().backward()
        return [parameter.grad.clone() for parameter in model.parameters()]

    everyone = torch.ones(4096, dtype=torch.bool)
    mixed = gradients(projector, everyone, RowGroups.per_row(groups, 4, CPU))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for _ in range(5):
            again = gradients(projector, everyone, RowGroups.per_row(groups, 4, CPU))
            assert all(torch.equal(a, b) for a, b in zip(mixed, again, strict=True))
    finally:
        torch.set_num_threads(threads)
    for group in range(4):
        rows = groups == group
        own = gradients(one_group_of(projector, group), rows, RowGroups.one(0, int(rows.sum()), 1, CPU))
        for mixed_grad, own_grad in zip(mixed, own, strict=True):
            torch.testing.assert_close(mixed_grad[group : group + 1], own_grad, rtol=1e-4, atol=1e-4)


def test_grouped_projector_takes_the_single_group_path_off_the_cpu(monkeypatch):
    """A homogeneous batch on a device other than the CPU (``meta`` here: no accelerator needed) skips the
    one-hot GEMMs, placeholders included: its group is known on the host. A mixed batch there uses them."""
    meta, groups, rows = torch.device("meta"), 3, 5
    with meta:
        projector = GroupedProjector(groups, 16, 8, 4, placeholders={"image": slice(0, 8), "title": slice(8, 16)})
    x = torch.randn(rows, 16, device=meta)
    present = torch.ones(rows, 2, dtype=torch.bool, device=meta)
    one_hot = recommender_module.F.one_hot

    def refuse(*args, **kwargs):
        raise AssertionError("one_hot on a group-homogeneous batch")

    monkeypatch.setattr(recommender_module.F, "one_hot", refuse)
    homogeneous = RowGroups.one(1, rows, groups, meta)
    assert homogeneous.ids.device.type == "meta"
    for out in (projector(x, homogeneous), projector(x, homogeneous, present)):
        assert out.shape == (rows, 4) and out.device.type == "meta"

    mixed = RowGroups.per_row(torch.tensor([0, 2, 1, 2, 0]), groups, meta)
    with pytest.raises(AssertionError, match="one_hot"):
        projector(x, mixed)
    calls = []

    def recording(ids, num_classes):
        calls.append((ids, num_classes))
        return one_hot(ids, num_classes)

    monkeypatch.setattr(recommender_module.F, "one_hot", recording)
    out = projector(x, mixed, present)
    assert out.shape == (rows, 4) and out.device.type == "meta"
    assert calls and all(ids is mixed.ids and num_classes == groups for ids, num_classes in calls)


def test_parameter_counts_match_paper_table_8():
    counts = parameter_counts("vit-b-32", "ia3", groups=8, items=18884)
    assert counts == {
        "clip_frozen": 151_277_313,
        "peft_per_group": 46_080,
        "projector_per_group": 67_872,
        "sasrec": 12_992,
        "transductive": 604_672,
        "global_peft_total": 731_616,
        "perpeft_total": 1_529_280,
    }
    assert parameter_counts("vit-b-32", "lora", groups=8, items=18884)["peft_per_group"] == 245_760


class ModuleAttentionSASRec(SASRec):
    """SASRec through `nn.MultiheadAttention`'s own forward: the reference `causal_attention` replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        for norm, attention, forward_norm, feed_forward in zip(
            self.attention_norms, self.attentions, self.forward_norms, self.feed_forwards, strict=True
        ):
            query = norm(x)
            x = forward_norm(query + attention(query, x, x, attn_mask=causal, need_weights=False)[0])
            x = feed_forward(x)
        return self.last_norm(x)


@pytest.mark.parametrize("training", [True, False])
def test_causal_attention_is_bitwise_nn_multihead_attention(training):
    """Same outputs, input and parameter gradients, and dropout draws, to the last bit: training results
    did not change when SASRec stopped calling the module."""
    torch.manual_seed(0)
    ours, reference = SASRec(32, 2, 4, 0.3), ModuleAttentionSASRec(32, 2, 4, 0.3)
    reference.load_state_dict(ours.state_dict())
    ours.train(training), reference.train(training)
    x = torch.randn(16, 10, 32)
    results = []
    for model in (ours, reference):
        torch.manual_seed(5)
        inputs = x.clone().requires_grad_()
        output = model(inputs)
        output.square().sum().backward()
        after = torch.rand(1)  # the next draw: equal only when both consumed the same random numbers
        results.append((output.detach(), inputs.grad, [parameter.grad for parameter in model.parameters()], after))
    (out, grad, grads, after), (ref_out, ref_grad, ref_grads, ref_after) = results
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad) and torch.equal(after, ref_after)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(grads, ref_grads, strict=True))
