"""The engine's CLIP equals transformers' ``CLIPModel`` on the same weights: tower outputs, every hidden state
and attention weight, and gradients, on right- and left-padded titles."""

import pytest
import torch
from transformers import CLIPModel

from perpeft.engine.clip.model import ClipModel, load_clip_model
from perpeft.engine.clip.tiny import TINY_CLIP_DIR


@pytest.fixture(scope="module")
def pair() -> tuple[CLIPModel, ClipModel]:
    stock = CLIPModel.from_pretrained(TINY_CLIP_DIR).eval()
    stock.set_attn_implementation("eager")  # the implementation that returns attention weights
    return stock, load_clip_model(TINY_CLIP_DIR).eval()


def titles(left_padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Four titles of 3–16 tokens (bos 1, eos 3, pad 0) in a 16-token window."""
    generator = torch.Generator().manual_seed(0)
    ids, mask = torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long)
    for row, length in enumerate((3, 16, 7, 10)):
        tokens = torch.cat(
            [torch.tensor([1]), torch.randint(4, 2048, (length - 2,), generator=generator), torch.tensor([3])]
        )
        columns = slice(16 - length, 16) if left_padded else slice(0, length)
        ids[row, columns], mask[row, columns] = tokens, 1
    return ids, mask


@pytest.mark.parametrize("left_padded", [False, True])
def test_text_tower_equals_transformers(pair: tuple[CLIPModel, ClipModel], left_padded: bool) -> None:
    stock, ours = pair
    ids, mask = titles(left_padded)
    with torch.no_grad():
        want = stock.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        got = ours.text_model(ids, mask, output_hidden_states=True, output_attentions=True)
    assert got.hidden_states is not None and got.attentions is not None
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
        # Left padding: a padded query sees no key; eager averages all of them, the engine gives it zero
        # weights as SDPA does. Only the kept rows feed the pooled output.
        torch.testing.assert_close(mine[mask.bool()], theirs[mask.bool()], rtol=1e-6, atol=1e-6)
    kept = mask.bool()[:, None, :, None]
    for mine, theirs in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(mine * kept, theirs * kept, rtol=1e-6, atol=1e-7)


def test_vision_tower_and_gradients_equal_transformers(pair: tuple[CLIPModel, ClipModel]) -> None:
    stock, ours = pair
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = titles(left_padded=False)
    with torch.no_grad():
        want = stock.vision_model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        got = ours.vision_model(pixels, output_hidden_states=True, output_attentions=True)
    assert got.hidden_states is not None and got.attentions is not None
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(got.hidden_states + got.attentions, want.hidden_states + want.attentions, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)

    def loss(model: torch.nn.Module, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        text_embeds, image_embeds = model.text_projection(text), model.visual_projection(image)
        return (text_embeds[:3] * image_embeds).sum()

    stock.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    loss(
        stock,
        stock.text_model(input_ids=ids, attention_mask=mask).pooler_output,
        stock.vision_model(pixel_values=pixels).pooler_output,
    ).backward()
    loss(ours, ours.text_model(ids, mask).pooler_output, ours.vision_model(pixels).pooler_output).backward()
    theirs = dict(stock.named_parameters())
    for name, parameter in ours.named_parameters():
        if theirs[name].grad is None:
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None, name
            torch.testing.assert_close(parameter.grad, theirs[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_longer_title_or_another_image_size_is_refused(pair: tuple[CLIPModel, ClipModel]) -> None:
    ours = pair[1]
    with pytest.raises(ValueError, match="exceed max_position_embeddings 16"):
        ours.text_model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="the model takes 32×32"):
        ours.vision_model(torch.zeros(1, 3, 16, 16))
