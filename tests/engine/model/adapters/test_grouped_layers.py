"""Grouped LoRA / (IA)3 layers against a per-row formula: mixed batches, one-group batches, LoRA dropout."""

import numpy as np
import pytest
import torch
from torch import nn

from perpeft.engine.model.adapters.context import GroupContext
from perpeft.engine.model.adapters.ia3 import GroupedIA3Linear
from perpeft.engine.model.adapters.lora import GroupedLoRALinear
from perpeft.engine.model.groups import RowGroups

CPU = torch.device("cpu")

GROUPS, RANK, ALPHA, TOKENS, WIDTH_IN, WIDTH_OUT = 4, 2, 6.0, 3, 8, 5
ITEM_GROUPS = {"mixed": [3, 0, 3, 1, 0], "one_group": [2, 2, 2, 2, 2]}


def _layer_inputs(case: str) -> tuple[nn.Linear, GroupContext, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.Linear(WIDTH_IN, WIDTH_OUT).requires_grad_(False)
    context = GroupContext()
    items = torch.tensor(ITEM_GROUPS[case])
    context.set(RowGroups.per_row(items, GROUPS, CPU))
    x = torch.randn(len(items), TOKENS, WIDTH_IN, requires_grad=True)
    return base, context, x, items.repeat_interleave(TOKENS).view(len(items), TOKENS)


@pytest.mark.parametrize("case", ITEM_GROUPS)
def test_lora_matches_per_row_formula(case: str) -> None:
    base, context, x, rows = _layer_inputs(case)
    layer = GroupedLoRALinear(base, GROUPS, RANK, ALPHA, 0.1, context).eval()
    nn.init.normal_(layer.lora_B)
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    weight = torch.randn(len(rows), TOKENS, WIDTH_OUT)

    (layer(x) * weight).sum().backward()
    x_grad, x.grad = x.grad, None
    delta = torch.einsum("itk,itrk->itr", x, a[rows])
    expected = base(x) + (ALPHA / RANK) * torch.einsum("itr,itmr->itm", delta, b[rows])
    (expected * weight).sum().backward()

    torch.testing.assert_close(layer(x), expected.detach())
    torch.testing.assert_close(x_grad, x.grad)
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)


@pytest.mark.parametrize("case", ITEM_GROUPS)
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_ia3_matches_per_row_formula(case: str, feedforward: bool) -> None:
    base, context, x, rows = _layer_inputs(case)
    layer = GroupedIA3Linear(base, GROUPS, feedforward, context)
    nn.init.normal_(layer.ia3_l)
    scales = layer.ia3_l.detach().clone().requires_grad_()

    layer(x).pow(2).sum().backward()
    expected = base(x * scales[rows]) if feedforward else base(x) * scales[rows]
    expected.pow(2).sum().backward()

    torch.testing.assert_close(layer(x), expected.detach())
    torch.testing.assert_close(layer.ia3_l.grad, scales.grad)


def test_lora_dropout_keeps_inputs_with_probability_1_minus_p_and_rescales_them() -> None:
    """With A = B = 1 (rank 1) and x = 1, each output is scaling / keep times the row's kept inputs, with
    keep = 1 - p for p on the 2⁻¹⁶ grid of the mask draws (0.1 rounds up to 6,554 / 65,536)."""
    p, items, tokens, width = 0.1, 64, 16, 32
    context = GroupContext()
    context.set(RowGroups.per_row(torch.arange(items) % GROUPS, GROUPS, CPU))
    base = nn.Linear(width, 1, bias=False).requires_grad_(False)
    nn.init.zeros_(base.weight)
    layer = GroupedLoRALinear(base, GROUPS, 1, 1.0, p, context)
    nn.init.ones_(layer.lora_A)
    nn.init.ones_(layer.lora_B)
    x = torch.ones(items, tokens, width)

    assert layer.keep_probability == 1 - 6554 / 2**16
    torch.manual_seed(0)
    kept = layer.train()(x).detach() * layer.keep_probability
    torch.testing.assert_close(kept, kept.round())  # whole numbers of kept inputs
    kept_fraction = kept.mean() / width
    assert abs(kept_fraction - (1 - p)) < 0.01  # 32,768 Bernoulli draws: std 0.0017
    assert torch.equal(layer.eval()(x), torch.full((items, tokens, 1), float(width)))


def test_lora_dropout_masks_on_cpu_are_pcg64_draws_seeded_from_torch() -> None:
    """The mask is the 16-bit draws of a PCG64 seeded by torch's generator: seeded runs (and resumes of runs
    written before the raw-output reading) draw the same masks."""
    layer = GroupedLoRALinear(nn.Linear(6, 6), 1, 1, 1.0, 0.3, GroupContext())
    rows = torch.zeros(5, 7)  # 35 draws: not a whole number of 64-bit outputs
    torch.manual_seed(4)
    mask = layer._keep_mask(rows)
    torch.manual_seed(4)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    draws = np.frombuffer(np.random.default_rng(seed).bytes(2 * 35), dtype=np.uint16).reshape(5, 7)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, torch.from_numpy((draws >= layer.drop_levels).astype(np.float32)))


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_lora_dropout_outside_unit_interval_is_rejected(dropout: float) -> None:
    with pytest.raises(ValueError, match="dropout"):
        GroupedLoRALinear(nn.Linear(2, 2), 1, 1, 1.0, dropout, GroupContext())
