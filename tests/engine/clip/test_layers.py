"""The engine's CLIP with its rewritten layers (QuickGELU folded into SiLU, frozen layers through oneDNN) and
pooled towers (the last layer at the pooled position only, titles on packed rows) equal stock HF CLIP,
forward and backward."""

import copy
from collections.abc import Callable

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from perpeft.engine.clip import pooled as pooled_module
from perpeft.engine.clip.layers import fold_quick_gelu, prepare_clip
from perpeft.engine.clip.model import QUICK_GELU_SLOPE, ClipModel, eos_positions
from perpeft.engine.clip.pooled import packed_title_rows, pooled_image, pooled_text, title_rows

TOKENS, BOS, EOS, VOCAB, LAYERS = 20, 60, 61, 62, 2


def random_clip(hidden_act: str = "quick_gelu") -> CLIPModel:
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": 4}
    tower["hidden_act"] = hidden_act
    text = {**tower, "vocab_size": VOCAB, "max_position_embeddings": TOKENS}
    text.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    config = CLIPConfig(text_config=text, vision_config={**tower, "image_size": 16, "patch_size": 8}, projection_dim=24)
    return CLIPModel(config)


def titles(lengths: list[int], left_padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.full((len(lengths), width), EOS)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.cat(
            [torch.tensor([BOS]), torch.randint(0, BOS, (length - 2,), generator=generator), torch.tensor([EOS])]
        )
        columns = slice(width - length, width) if left_padded else slice(0, length)
        ids[row, columns], mask[row, columns] = tokens, 1
    return ids, mask


@pytest.fixture(scope="module")
def models(to_engine_clip: Callable[[CLIPModel], ClipModel]) -> tuple[CLIPModel, ClipModel]:
    stock = random_clip().train()
    rewritten = to_engine_clip(stock).train()
    prepare_clip(rewritten)
    return stock, rewritten


def features(
    model: CLIPModel | ClipModel, ids: torch.Tensor, mask: torch.Tensor | None, pixels: torch.Tensor
) -> torch.Tensor:
    """concat(text, image) projected features: HF's ``get_*_features``, or the engine CLIP's towers projected."""
    if isinstance(model, ClipModel):
        text = model.text_projection(model.text_model(ids, mask).pooler_output)
        return torch.cat([text, model.visual_projection(model.vision_model(pixels).pooler_output)], dim=-1)
    text = model.get_text_features(input_ids=ids, attention_mask=mask)
    image = model.get_image_features(pixel_values=pixels)
    return torch.cat([getattr(text, "pooler_output", text), getattr(image, "pooler_output", image)], dim=-1)


def padded_batch(padding: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Five titles padded as ``padding`` says ("right, no mask", "right, mask", "left, mask": with the EOS id as
    padding; "left, pad 0, mask": another id) and five images."""
    ids, mask = titles([3, 9, 14, 20, 6], left_padded=padding.startswith("left"))
    if "pad 0" in padding:
        ids = ids.masked_fill(mask == 0, 0)
    pixels = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return ids, None if padding.endswith("no mask") else mask, pixels


def outputs_and_grads(
    model: torch.nn.Module, forward: Callable[[], torch.Tensor], weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """``forward()``'s output and every parameter's gradient of ``(output * weights).sum()``."""
    model.zero_grad(set_to_none=True)
    out = forward()
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("padding", ["right, no mask", "right, mask", "left, mask"])
def test_rewritten_clip_gives_stock_features_and_gradients(models: tuple[CLIPModel, ClipModel], padding: str) -> None:
    stock, rewritten = models
    ids, mask, pixels = padded_batch(padding)
    weights = torch.randn(5, 48, generator=torch.Generator().manual_seed(3))
    stock_out, stock_grads = outputs_and_grads(stock, lambda: features(stock, ids, mask, pixels), weights)
    out, grads = outputs_and_grads(rewritten, lambda: features(rewritten, ids, mask, pixels), weights)
    torch.testing.assert_close(out, stock_out, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        # w' = 1.702·w in fc1 (so dL/dw' = dL/dw / 1.702) and w' = w / 1.702 in fc2's weight.
        factor = 1 / QUICK_GELU_SLOPE if ".fc1." in name else QUICK_GELU_SLOPE if name.endswith("fc2.weight") else 1
        if stock_grads[name] is None:
            assert grad is None, name
            continue
        expected = stock_grads[name] * factor
        scale = float(expected.abs().max().clamp_min(1.0))
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_fully_masked_rows_match_sdpa(models: tuple[CLIPModel, ClipModel]) -> None:
    """Left padding: the first query rows may attend to nothing; SDPA gives them zero attention, and so must
    the rewrite (a pad-as-EOS CLIP pools such a row)."""
    stock, rewritten = models
    ids, mask = titles([3, 20], left_padded=True)
    with torch.no_grad():
        expected = stock.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = rewritten.text_model(ids, mask).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_attention_weights_equal_eager(models: tuple[CLIPModel, ClipModel]) -> None:
    stock, rewritten = models
    ids, mask = titles([4, 11, 7])
    eager = copy.deepcopy(stock).eval()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        expected = eager.text_model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        actual = rewritten.eval().text_model(ids, mask, output_attentions=True).attentions
    rewritten.train()
    assert actual is not None and len(actual) == LAYERS
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_quick_gelu_mlps_are_folded(to_engine_clip: Callable[[CLIPModel], ClipModel]) -> None:
    assert fold_quick_gelu(to_engine_clip(random_clip("quick_gelu"))) == 2 * LAYERS
    assert fold_quick_gelu(to_engine_clip(random_clip("gelu"))) == 0


def pooled(model: ClipModel, ids: torch.Tensor, mask: torch.Tensor | None, pixels: torch.Tensor, tower: str):
    """concat(text, image) pooled outputs: the full towers (``full``) or `pooled_text` (``padded`` or ``packed``
    rows) and `pooled_image`."""
    if tower == "full":
        text = model.text_model(ids, mask).pooler_output
        return torch.cat([text, model.vision_model(pixels).pooler_output], dim=-1)
    packing = title_rows(ids, mask, EOS) if tower == "packed" else None
    text = pooled_text(model.text_model, ids, mask, packing)
    return torch.cat([text, pooled_image(model.vision_model, pixels)], dim=-1)


@pytest.mark.parametrize("tower", ["padded", "packed"])
@pytest.mark.parametrize("folded", [True, False])
@pytest.mark.parametrize("padding", ["right, no mask", "right, mask", "left, mask", "left, pad 0, mask"])
def test_pooled_towers_equal_full_towers(
    models: tuple[CLIPModel, ClipModel], padding: str, folded: bool, tower: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last layer run at the pooled position only (its keys and values folded into the query, or
    projected at every position), on padded or packed title rows, gives the full tower's pooled outputs and
    gradients."""
    model = copy.deepcopy(models[1])
    if not folded:
        monkeypatch.setattr(pooled_module, "_folds", lambda attention, rows: False)
    ids, mask, pixels = padded_batch(padding)
    weights = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    out_full, grads_full = outputs_and_grads(model, lambda: pooled(model, ids, mask, pixels, "full"), weights)
    out, grads = outputs_and_grads(model, lambda: pooled(model, ids, mask, pixels, tower), weights)
    torch.testing.assert_close(out, out_full, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_full.keys()
    for name, grad in grads.items():
        expected = grads_full[name]
        if expected is None or not expected.any():
            assert grad is None or not grad.any(), name
            continue
        scale = float(expected.abs().max().clamp_min(1.0))
        if grad is None:
            # The last layer's key bias adds q·b_k to every score of a query, which the softmax cancels: its
            # gradient is zero, float noise in the full tower; the folded pooled layer never reads it.
            assert folded and name.endswith("layers.1.self_attn.k_proj.bias"), name
            assert float(expected.abs().max()) < 1e-5 * scale, name
            continue
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_eos_positions_follow_clip() -> None:
    """The first EOS id (pad-as-EOS catalogs repeat it), or the highest id for the legacy ``eos_token_id`` 2."""
    ids = torch.tensor([[5, 7, 9, 9, 9], [5, 9, 3, 9, 9], [49406, 320, 49407, 0, 0]])
    assert eos_positions(ids, 9).tolist() == [2, 1, 0]
    assert eos_positions(ids, 2).tolist() == [2, 1, 2]
    input_ids = torch.tensor([[1, 7, 3, 0, 3], [1, 3, 9, 9, 0]])
    assert eos_positions(input_ids, 3).tolist() == [2, 1]
    legacy = torch.tensor([[49406, 320, 49407, 49407], [49406, 49407, 0, 0]])
    assert eos_positions(legacy, 2).tolist() == [2, 1]  # eos_token_id 2: the largest id (openai configs)


def test_title_rows_keep_each_titles_tokens_up_to_its_eos() -> None:
    """Rows after the EOS (padding, repeated pad-as-EOS ids) and masked ones are dropped; the EOS row is last."""
    ids = torch.tensor([[BOS, 5, EOS, EOS, EOS], [BOS, 7, 8, 9, EOS], [EOS, BOS, 3, EOS, EOS]])
    rows = title_rows(ids, None, EOS)
    assert rows.lengths.tolist() == [3, 5, 1]
    assert rows.items.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2]
    assert rows.columns.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    assert rows.pooled.tolist() == [2, 7, 8]
    left, left_mask = titles([3, 5], left_padded=True)
    left = left.masked_fill(left_mask == 0, 0)  # a pad id that is not the EOS
    masked = title_rows(left, left_mask, EOS)
    assert masked.lengths.tolist() == [3, 5]
    assert masked.columns.tolist() == [2, 3, 4, 0, 1, 2, 3, 4]
    assert masked.pooled.tolist() == [2, 7]
    hidden = torch.arange(2 * 5 * 6.0).view(2, 5, 6)
    packed = masked.pack(hidden)
    assert packed.shape == (8, 6)
    heads = masked.heads(packed, 2)  # [B, H, L, D], laid out for the attention's batched GEMMs
    assert heads.shape == (2, 2, 5, 3) and heads.is_contiguous()
    restored = heads.transpose(1, 2).reshape(2, 5, 6)
    assert torch.equal(restored[left_mask.bool()], hidden[left_mask.bool()])
    assert not restored[~left_mask.bool()].any()
    # Pad-as-EOS left padding: the first EOS is a masked pad, so that title keeps every row.
    ids, mask = titles([3, 5], left_padded=True)
    kept = title_rows(ids, mask, EOS)
    assert kept.lengths.tolist() == [5, 5]
    assert kept.pooled.tolist() == [0, 9]


def test_titles_are_packed_on_the_cpu_when_that_drops_enough_rows() -> None:
    short, mask = titles([3, 9, 14, 20, 6])  # 52 of 100 rows
    assert packed_title_rows(short, mask, EOS) is not None
    full, full_mask = titles([20, 20, 20, 19, 20])  # 99 of 100 rows: not worth moving
    assert packed_title_rows(full, full_mask, EOS) is None
    edge, edge_mask = titles([20, 20, 20, 5, 20])  # 85 of 100: the bound still packs
    assert packed_title_rows(edge, edge_mask, EOS) is not None
    assert packed_title_rows(short.to("meta"), mask.to("meta"), EOS) is None  # only the CPU packs
