"""The CLIP item encoder: token columns cut to a batch's longest title change no item vector, the vectors
are stock CLIP's features, and towers started from the catalog's stored first-layer prefix give the same."""

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from perpeft.engine.clip import pooled
from perpeft.engine.clip.loading import ClipBundle
from perpeft.engine.clip.model import ClipModel
from perpeft.engine.clip.preprocess import normalize_pixels
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.features.inputs import ItemInputs
from perpeft.engine.model import encoders
from perpeft.engine.model.encoders import GroupedClipEncoder
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.prefix import CatalogPrefix
from perpeft.engine.model.run_inputs import load_run_inputs

TOKENS, BOS, EOS, VOCAB, ITEMS, GROUPS = 77, 510, 511, 512, 40, 3
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stock() -> CLIPModel:
    """A random transformers CLIP with HF's 77-token layout (pad = EOS, EOS pooling by id, not the legacy
    argmax)."""
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {**tower, "vocab_size": VOCAB, "max_position_embeddings": TOKENS}
    text.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    config = CLIPConfig(text_config=text, vision_config={**tower, "image_size": 16, "patch_size": 8}, projection_dim=24)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def bundle(stock: CLIPModel, to_engine_clip: Callable[[CLIPModel], ClipModel]) -> ClipBundle:
    """The engine's CLIP holding ``stock``'s weights."""
    return ClipBundle(to_engine_clip(stock).eval(), None, "random", 16, CLIP_MEAN, CLIP_STD, "random")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> ItemInputs:
    """Titles of 3–30 tokens padded to 77 columns; row 0 is the padding item (BOS EOS)."""
    rng = np.random.default_rng(0)
    input_ids = np.full((ITEMS + 1, TOKENS), EOS, dtype=np.int64)
    attention_mask = np.zeros((ITEMS + 1, TOKENS), dtype=np.int64)
    for row, length in enumerate([2, *rng.integers(3, 31, size=ITEMS)]):
        input_ids[row, :length] = [BOS, *rng.integers(0, BOS, size=length - 2), EOS]
        attention_mask[row, :length] = 1
    pixels = rng.integers(0, 256, size=(ITEMS + 1, 3, 16, 16), dtype=np.uint8)
    present = np.ones((ITEMS + 1, 2), dtype=bool)
    return ItemInputs(input_ids, attention_mask, pixels, present, Path(tmp_path_factory.mktemp("inputs")))


@pytest.fixture(scope="module")
def encoder(bundle: ClipBundle) -> GroupedClipEncoder:
    """Grouped LoRA with non-zero, different B per group, so every group's adapter changes the output."""
    torch.manual_seed(1)
    encoder = GroupedClipEncoder(bundle, "lora", GROUPS).eval()
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.5)
    return encoder


def full_width(inputs: ItemInputs, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
    index = items.numpy()
    return tuple(
        torch.from_numpy(np.array(array[index])) for array in (inputs.input_ids, inputs.attention_mask, inputs.pixels)
    )


def test_text_widths_end_at_each_titles_last_token(inputs: ItemInputs) -> None:
    np.testing.assert_array_equal(inputs.text_widths, inputs.attention_mask.sum(axis=1))
    assert inputs.right_padded
    items = torch.tensor([3, 7, 0, 12])
    input_ids, attention_mask, _ = inputs.batch(items, torch.device("cpu"))
    assert input_ids.shape[1] == inputs.attention_mask[items.numpy()].sum(axis=1).max()
    assert attention_mask is None  # right padding: causal attention never reaches the padded columns
    assert inputs.text_widths.max() < TOKENS  # the test cuts columns for real


def test_a_mask_with_gaps_is_kept(inputs: ItemInputs, tmp_path: Path) -> None:
    mask = np.array(inputs.attention_mask)
    mask[5, 1] = 0  # a hole inside title 5: the mask is no longer a prefix
    holed = ItemInputs(inputs.input_ids, mask, inputs.pixels, inputs.present, tmp_path)
    assert not holed.right_padded
    _, attention_mask, _ = holed.batch(torch.tensor([5, 6]), torch.device("cpu"))
    np.testing.assert_array_equal(attention_mask.numpy(), mask[[5, 6], : holed.text_widths[[5, 6]].max()])


def test_cut_token_columns_give_the_untrimmed_item_vectors(inputs: ItemInputs, encoder: GroupedClipEncoder) -> None:
    items = torch.arange(ITEMS + 1)
    groups = RowGroups.per_row(items % GROUPS, GROUPS, CPU)
    with torch.no_grad():
        untrimmed = encoder(*full_width(inputs, items), groups)
        trimmed = encoder(*inputs.batch(items, CPU), groups)
        smaller_batch = encoder(*inputs.batch(items[:5], CPU), groups.take(torch.arange(5)))
    torch.testing.assert_close(trimmed, untrimmed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(smaller_batch, untrimmed[:5], rtol=1e-5, atol=1e-6)


def test_item_vectors_equal_stock_clip_features(inputs: ItemInputs, bundle: ClipBundle, stock: CLIPModel) -> None:
    """The encoder's rewritten CLIP layers (``engine/clip/layers.py``) give stock ``CLIPModel``'s features."""
    items = torch.arange(ITEMS + 1)
    input_ids, attention_mask, pixels = full_width(inputs, items)
    encoder = GroupedClipEncoder(bundle, "none", 1).eval()
    with torch.no_grad():
        vectors = encoder(*inputs.batch(items, CPU), RowGroups.one(0, len(items), 1, CPU))
        pixel_values = normalize_pixels(pixels, encoder.image_mean, encoder.image_std)
        image = stock.get_image_features(pixel_values=pixel_values)
        text = stock.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    parts = [getattr(part, "pooler_output", part) for part in (image, text)]
    expected = torch.cat([torch.nn.functional.normalize(part, dim=-1) for part in parts], dim=-1)
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("peft", ["lora", "ia3"])
@pytest.mark.parametrize(("modalities", "unused"), [(("title",), "vision_model"), (("image",), "text_model")])
def test_a_tower_the_encoder_never_runs_has_no_adapters(
    bundle: ClipBundle, inputs: ItemInputs, peft: str, modalities: tuple[str, ...], unused: str
) -> None:
    """Every trainable parameter takes part in the loss: DistributedDataParallel (without its unused-parameter
    search) fails on one that gets no gradient, as the adapters of a dropped tower did."""
    encoder = GroupedClipEncoder(bundle, peft, GROUPS, modalities)
    trainable = [name for name, parameter in encoder.named_parameters() if parameter.requires_grad]
    assert trainable and not [name for name in trainable if f".{unused}." in f".{name}"]
    items = torch.arange(1, 9)
    encoder(*full_width(inputs, items), RowGroups.per_row(items % GROUPS, GROUPS, CPU)).sum().backward()
    assert all(parameter.grad is not None for parameter in encoder.parameters() if parameter.requires_grad)


def _holed(inputs: ItemInputs, directory: Path) -> ItemInputs:
    """The catalog with a hole in one title's mask: not right-padded, so batches carry a padding mask."""
    mask = np.array(inputs.attention_mask)
    mask[5, 1] = 0
    return ItemInputs(inputs.input_ids, mask, inputs.pixels, inputs.present, directory)


def _pass(
    encoder: GroupedClipEncoder, inputs: ItemInputs, items: torch.Tensor, prefix: CatalogPrefix | None, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output of ``items`` (mixed groups) and the adapters' gradients of a weighted sum of it; LoRA's
    dropout masks drawn from ``seed``."""
    encoder.zero_grad(set_to_none=True)
    groups = RowGroups.per_row(items % GROUPS, GROUPS, CPU)
    torch.manual_seed(seed)
    rows = None if prefix is None else prefix.take(items)
    out = encoder(*inputs.batch(items, CPU), groups, prefix=rows)
    if encoder.training:
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = {name: p.grad for name, p in encoder.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("peft", ["lora", "ia3"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("holed", [False, True])
def test_the_catalog_prefix_gives_the_vectors_and_gradients_of_the_inputs(
    bundle: ClipBundle,
    inputs: ItemInputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    peft: str,
    packed: bool,
    holed: bool,
) -> None:
    """Towers started from every item's stored first-layer prefix give the item vectors, and the adapters'
    gradients, of the towers run from tokens and pixels: titles packed or padded, with or without a padding
    mask, mixed groups, LoRA's dropout on (the same draws), and in eval mode."""
    catalog = _holed(inputs, tmp_path) if holed else inputs
    if not packed:
        monkeypatch.setattr(pooled, "PACKED_ROWS_AT_MOST", 0.0)
    torch.manual_seed(2)
    encoder = GroupedClipEncoder(bundle, peft, GROUPS).train()
    with torch.no_grad():  # off the initialisation (LoRA B = 0, (IA)3 = 1), so a skipped adapter would show
        for parameter in encoder.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    prefix = encoder.catalog_prefix(catalog, chunk=16)
    assert prefix is not None and prefix.title is not None and prefix.image is not None
    assert prefix.title.shape[:2] == (ITEMS + 1, catalog.text_widths.max())
    items = torch.tensor([5, 3, 17, 0, 40, 22, 9, 31, 6])
    assert (pooled.packed_title_rows(*catalog.batch(items, CPU)[:2], EOS) is not None) == packed
    expected, expected_grads = _pass(encoder, catalog, items, None, seed=3)
    started, grads = _pass(encoder, catalog, items, prefix, seed=3)
    torch.testing.assert_close(started, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) == len(encoder.adapter_state())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            _pass(encoder, catalog, items, prefix, 0)[0],
            _pass(encoder, catalog, items, None, 0)[0],
            rtol=1e-5,
            atol=1e-6,
        )


def test_no_catalog_prefix_past_its_memory_bound_or_for_a_one_layer_tower(
    bundle: ClipBundle, inputs: ItemInputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = GroupedClipEncoder(bundle, "lora", GROUPS)
    prefix = encoder.catalog_prefix(inputs, chunk=64)
    assert prefix is not None and prefix.title is not None and prefix.image is not None
    size = prefix.title.numel() * prefix.title.element_size() + prefix.image.numel() * prefix.image.element_size()
    monkeypatch.setattr(encoders, "PREFIX_BYTES_AT_MOST", size)
    assert encoder.catalog_prefix(inputs, chunk=64) is not None
    monkeypatch.setattr(encoders, "PREFIX_BYTES_AT_MOST", size - 1)
    assert encoder.catalog_prefix(inputs, chunk=64) is None
    # A one-layer text tower: its only layer runs at the EOS position, with nothing frozen before it.
    config = bundle.model.config
    config = dataclasses.replace(config, text_config=dataclasses.replace(config.text_config, num_hidden_layers=1))
    shallow = ClipBundle(ClipModel(config).eval(), None, "random", 16, CLIP_MEAN, CLIP_STD, "random")
    assert GroupedClipEncoder(shallow, "lora", GROUPS).catalog_prefix(inputs, chunk=64) is None
    assert GroupedClipEncoder(shallow, "lora", GROUPS, ("image",)).catalog_prefix(inputs, chunk=64) is not None


def test_a_prefix_refuses_titles_wider_than_it_holds(bundle: ClipBundle, inputs: ItemInputs) -> None:
    prefix = GroupedClipEncoder(bundle, "lora", GROUPS, ("title",)).catalog_prefix(inputs, chunk=64)
    assert prefix is not None and prefix.image is None
    rows = prefix.take(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="positions, but the prefix holds"):
        rows.title(None, TOKENS)
    with pytest.raises(ValueError, match="no image tower"):
        rows.image()


def test_the_model_builds_the_catalog_prefix_once_and_its_tables_match(
    small_demo: Path, small_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PerpeftModel` builds the prefix on first use on the CPU and reuses it; its item tables equal those
    of the towers run from their inputs (float rounding: eval mode adds the LoRA branch to the stored base
    output instead of merging the weights)."""
    config = small_config(small_demo, groups=3).resolved()
    run_inputs = load_run_inputs(config, run_dataset(config), progress=False)
    torch.manual_seed(0)
    models = [
        PerpeftModel(config, run_inputs.make_encoder, run_inputs.inputs, run_inputs.dataset.num_items, 3).eval()
        for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    with torch.no_grad():
        for parameter in models[0].encoder.adapter_state().values():
            parameter.add_(0.05 * torch.randn_like(parameter))
    models[1].load_state_dict(models[0].state_dict())
    built = []
    encoder = models[1].encoder
    original = encoder.catalog_prefix
    monkeypatch.setattr(encoder, "catalog_prefix", lambda *args: built.append(original(*args)) or built[-1])
    monkeypatch.setattr(models[0].encoder, "catalog_prefix", lambda *args: None)
    tables = [model.item_tables(run_inputs.dataset.num_items, 64) for model in models]
    models[1].item_tables(run_inputs.dataset.num_items, 64)
    assert len(built) == 1 and built[0] is not None
    torch.testing.assert_close(tables[1], tables[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [True, False])
def test_the_folded_pooled_layer_trains_as_the_unfolded_one(
    bundle: ClipBundle, inputs: ItemInputs, monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """LoRA in training (dropout on, the same draws, mixed groups): the last layer with ``k_proj`` and
    ``v_proj`` folded into the pooled query (the engine's CPU attention) gives the vectors and adapter
    gradients of that layer run at every position."""
    if not packed:
        monkeypatch.setattr(pooled, "PACKED_ROWS_AT_MOST", 0.0)
    torch.manual_seed(4)
    folded = GroupedClipEncoder(bundle, "lora", GROUPS).train()
    with torch.no_grad():
        for parameter in folded.adapter_state().values():
            parameter.add_(0.3 * torch.randn_like(parameter))
    unfolded = copy.deepcopy(folded)
    items = torch.tensor([5, 3, 17, 40, 22, 9, 31, 6])
    actual, grads = _pass(folded, inputs, items, None, seed=6)
    monkeypatch.setattr(pooled, "_folds", lambda attention, rows: False)
    expected, expected_grads = _pass(unfolded, inputs, items, None, seed=6)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) == len(folded.adapter_state())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
