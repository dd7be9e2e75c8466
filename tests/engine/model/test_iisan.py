"""IISAN: the grouped side network, the hidden-state cache (built once, rebuilt on change), training on it."""

import copy
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from perpeft.engine.clip.model import ClipEncoderLayer, load_clip_model
from perpeft.engine.clip.preprocess import normalize_pixels
from perpeft.engine.clip.tiny import TINY_CLIP_DIR
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.demo import DemoSpec, generate_demo
from perpeft.engine.data.formats import load_recbole
from perpeft.engine.data.sampler import Batch
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.features import hidden_states as hidden_cache
from perpeft.engine.features.hidden_states import (
    clip_fingerprint,
    hidden_layer_indices,
    load_hidden_states,
)
from perpeft.engine.features.inputs import load_item_inputs
from perpeft.engine.model.adapters.iisan import GroupedIISAN
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.params import parameter_counts
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import iisan_encoder_factory, load_run_inputs
from perpeft.engine.train.pipeline import train_new_run

CPU = torch.device("cpu")


def per_group_parameters(text: int, image: int, layers: int, bottleneck: int = 32) -> int:
    """Per layer: text, image and inter bottlenecks (down + bias, up + bias), Linear(image→text); 3 gates."""

    def block(dim: int) -> int:
        return 2 * dim * bottleneck + bottleneck + dim

    return layers * (2 * block(text) + block(image) + image * text + text + 3)


def reference_iisan(side: GroupedIISAN, group: int, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The reference notes' recurrences for one group, written out with plain functional ops."""
    g = torch.sigmoid(side.gates[group])

    def block(blocks, layer: int, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(F.linear(x, blocks.down[group, layer], blocks.down_bias[group, layer]))
        return x + F.linear(hidden, blocks.up[group, layer], blocks.up_bias[group, layer])

    for layer in range(side.layers):
        t, v = text[:, layer], image[:, layer]
        cross = g[2, layer] * t + (1 - g[2, layer]) * F.linear(v, side.fuse[group, layer], side.fuse_bias[group, layer])
        if layer == 0:
            a, b, c = t, v, cross
        else:
            a = g[0, layer] * a + (1 - g[0, layer]) * t
            b = g[1, layer] * b + (1 - g[1, layer]) * v
            c = c + cross
        a, b, c = (
            block(side.text_blocks, layer, a),
            block(side.image_blocks, layer, b),
            block(side.inter_blocks, layer, c),
        )
    return torch.cat([a, b, c], dim=-1)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    spec = DemoSpec(num_domains=2, num_users=96, items_per_domain=24, min_seq_len=5, max_seq_len=8)
    return generate_demo(tmp_path_factory.mktemp("data") / "shop", seed=3, spec=spec)


@pytest.fixture
def small_inputs(small_demo, small_bundle):
    dataset = load_recbole(small_demo)
    return load_item_inputs(dataset, small_bundle.tokenizer, small_bundle.tokenizer_id, 16, progress=False)


@pytest.fixture
def count_builds(monkeypatch) -> list[int]:
    """Counts calls of the cache builder (which still runs)."""
    calls = []
    original = hidden_cache._build_hidden_states

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hidden_cache, "_build_hidden_states", counted)
    return calls


def test_shapes_and_parameter_count():
    side = GroupedIISAN(3, 12, 20, 4, bottleneck=5)
    groups = RowGroups.per_row(torch.tensor([0, 2, 1, 2, 0, 0]), 3, CPU)
    out = side(torch.randn(6, 4, 12), torch.randn(6, 4, 20), groups)
    assert out.shape == (6, side.out_features) == (6, 12 + 20 + 12)
    assert sum(p.numel() for p in side.parameters()) == 3 * per_group_parameters(12, 20, 4, bottleneck=5)
    with torch.device("meta"):
        vit_b_32 = GroupedIISAN(1, 512, 768, 7)
    assert vit_b_32.out_features == 1792
    assert sum(p.numel() for p in vit_b_32.parameters()) == per_group_parameters(512, 768, 7) == 3_572_149
    counts = parameter_counts("vit-b-32", "iisan", 8, 18_884)
    assert counts["peft_per_group"] == 3_572_149
    assert counts["projector_per_group"] == (1792 * 64 + 64) + 2 * 64 + (64 * 32 + 32) + 2 * 32


def test_gates_start_at_one_half_and_blocks_near_zero():
    side = GroupedIISAN(2, 512, 768, 7)
    assert torch.equal(side.gates, torch.zeros(2, 3, 7))
    assert torch.equal(torch.sigmoid(side.gates), torch.full((2, 3, 7), 0.5))
    blocks = torch.cat(
        [
            p.detach().flatten()
            for chain in (side.text_blocks, side.image_blocks, side.inter_blocks)
            for p in chain.parameters()
        ]
    )
    assert abs(float(blocks.mean())) < 1e-6
    assert float(blocks.std()) == pytest.approx(1e-4, rel=0.01)
    bound = 1 / math.sqrt(768)  # nn.Linear's default for the image → text projections
    assert float(side.fuse.detach().abs().max()) <= bound and float(side.fuse.detach().std()) == pytest.approx(
        bound / math.sqrt(3), rel=0.01
    )


def test_mixed_group_batch_equals_each_group_alone():
    torch.manual_seed(0)
    side = GroupedIISAN(4, 12, 20, 4, bottleneck=5)  # group 3 has no rows: only present groups are packed
    with torch.no_grad():
        for parameter in side.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    text, image = torch.randn(9, 4, 12), torch.randn(9, 4, 20)
    group_ids = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0])
    weights = torch.randn(9, side.out_features)

    mixed = side(text, image, RowGroups.per_row(group_ids, 4, CPU))
    (mixed * weights).sum().backward()
    mixed_grads = [p.grad.clone() for p in side.parameters()]
    side.zero_grad()
    total = 0
    for group in range(3):
        rows = group_ids == group
        alone = side(text[rows], image[rows], RowGroups.per_row(group_ids[rows], 4, CPU))
        torch.testing.assert_close(mixed[rows], alone)
        torch.testing.assert_close(alone, reference_iisan(side, group, text[rows], image[rows]))
        total = total + (alone * weights[rows]).sum()
    total.backward()
    for mixed_grad, parameter in zip(mixed_grads, side.parameters(), strict=True):
        torch.testing.assert_close(mixed_grad, parameter.grad)
        assert not mixed_grad[3].any()


def test_training_step_sends_no_gradient_into_clip(small_bundle, small_inputs):
    states = load_hidden_states(small_bundle, small_inputs, CPU, progress=False)
    text, image = states.batch(torch.tensor([1, 2, 3]), CPU)
    assert not text.requires_grad and not image.requires_grad
    config = RunConfig(peft="iisan", groups=2, device="cpu")
    model = PerpeftModel(config, iisan_encoder_factory(states), states, small_inputs.input_ids.shape[0] - 1, 2)
    clip_parameters = {id(p) for p in small_bundle.model.parameters()}
    assert not clip_parameters & {id(p) for p in model.parameters()}
    seq = np.array([[0, 1, 2, 3, 4]])
    batch = Batch(np.array([1]), seq, np.array([[0, 2, 3, 4, 5]]), np.array([[0, 9, 8, 7, 6]]), group=1)
    model.training_loss(batch, CPU).backward()
    assert all(p.grad is None for p in small_bundle.model.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_cached_states_are_clip_hidden_states_at_eos_and_cls(small_bundle, small_inputs):
    states = load_hidden_states(small_bundle, small_inputs, CPU, progress=False)
    assert (states.layers, states.text_dim, states.image_dim) == (3, 32, 32)
    items = torch.tensor([1, 5, 9])
    input_ids, attention_mask, pixels = small_inputs.batch(items, CPU)
    mean, std = torch.tensor(small_bundle.image_mean), torch.tensor(small_bundle.image_std)
    model = small_bundle.model
    with torch.no_grad():
        text = model.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        vision = model.vision_model(pixel_values=normalize_pixels(pixels, mean, std), output_hidden_states=True)
    eos = [row.index(98) for row in input_ids.tolist()]  # small_tokenizer's eos id
    cached_text, cached_image = states.batch(items, CPU)
    torch.testing.assert_close(
        cached_text, torch.stack([state[torch.arange(3), eos] for state in text.hidden_states], 1)
    )
    torch.testing.assert_close(cached_image, torch.stack([state[:, 0] for state in vision.hidden_states], 1))
    # The last text state is the one CLIP pools: after the final LayerNorm it is the pooled output.
    torch.testing.assert_close(model.text_model.final_layer_norm(cached_text[:, -1]), text.pooler_output)
    assert not states.text[0].any() and not states.image[0].any()
    assert isinstance(states.text, np.memmap)
    with safe_open(states.path, "pt") as file:
        assert file.metadata()["text_layers"] == "[0, 1, 2]"
        assert torch.equal(file.get_tensor("text"), torch.from_numpy(np.array(states.text)))
        assert torch.equal(file.get_tensor("image"), torch.from_numpy(np.array(states.image)))


@pytest.mark.parametrize(
    ("layers", "expected"),
    [(12, [0, 2, 4, 6, 8, 10, 12]), (24, [0, 4, 8, 12, 16, 20, 24]), (2, [0, 1, 2]), (8, [0, 1, 2, 4, 5, 6, 8])],
)
def test_hidden_layer_indices(layers, expected):
    assert hidden_layer_indices(layers, min(7, layers + 1)) == expected


def test_cache_is_built_once_and_reused(small_bundle, small_inputs, monkeypatch):
    first = load_hidden_states(small_bundle, small_inputs, CPU, progress=False)
    built_at = first.path.stat().st_mtime_ns
    monkeypatch.setattr(hidden_cache, "_build_hidden_states", lambda *args: pytest.fail("cache rebuilt"))
    second = load_hidden_states(small_bundle, small_inputs, CPU, progress=False)
    assert second.path == first.path and second.path.stat().st_mtime_ns == built_at


def test_a_damaged_cache_is_built_again(small_bundle, small_inputs, count_builds, caplog):
    first = load_hidden_states(small_bundle, small_inputs, CPU, progress=False)
    expected, builds = (np.array(first.text), np.array(first.image)), len(count_builds)
    first.path.write_bytes(first.path.read_bytes()[: first.path.stat().st_size - 64])  # cut short
    again = load_hidden_states(small_bundle, small_inputs, CPU, progress=False)
    np.testing.assert_array_equal(np.array(again.text), expected[0])
    np.testing.assert_array_equal(np.array(again.image), expected[1])
    assert len(count_builds) == builds + 1
    assert any("damaged cache" in record.getMessage() for record in caplog.records)


def test_changed_catalog_rebuilds(small_demo, small_bundle, small_inputs, count_builds):
    original = load_hidden_states(small_bundle, small_inputs, CPU, progress=False)
    dataset = load_recbole(small_demo)
    dataset.titles[2] += " renamed"
    changed_inputs = load_item_inputs(dataset, small_bundle.tokenizer, small_bundle.tokenizer_id, 16, progress=False)
    builds = len(count_builds)
    changed = load_hidden_states(small_bundle, changed_inputs, CPU, progress=False)
    assert changed.path != original.path and len(count_builds) == builds + 1
    assert not np.array_equal(changed.text[2], original.text[2])
    np.testing.assert_array_equal(changed.image, original.image)


def test_changed_clip_weights_rebuild(small_bundle, small_inputs, count_builds):
    original = load_hidden_states(small_bundle, small_inputs, CPU, progress=False)
    changed_bundle = copy.deepcopy(small_bundle)
    with torch.no_grad():
        changed_bundle.model.vision_model.embeddings.class_embedding[0] += 0.01
    builds = len(count_builds)
    changed = load_hidden_states(changed_bundle, small_inputs, CPU, progress=False)
    assert changed.path != original.path and len(count_builds) == builds + 1
    assert not np.array_equal(changed.image, original.image)
    np.testing.assert_array_equal(changed.text, original.text)


def test_fingerprint_of_a_checkpoint_is_hashed_once_per_file_version(tmp_path, monkeypatch):
    checkpoint = tmp_path / "clip"
    shutil.copytree(TINY_CLIP_DIR, checkpoint)
    model = load_clip_model(checkpoint)
    hashes = []
    original = hidden_cache._hash_model
    monkeypatch.setattr(hidden_cache, "_hash_model", lambda m: hashes.append(1) or original(m))
    fingerprint = clip_fingerprint(model)
    assert clip_fingerprint(model) == fingerprint and len(hashes) == 1
    weights = checkpoint / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert clip_fingerprint(model) == fingerprint and len(hashes) == 2
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight.mul_(1.01)
    assert clip_fingerprint(model) != fingerprint and len(hashes) == 3


def test_iisan_trains_end_to_end_without_running_clip(small_demo, tmp_path, monkeypatch, assert_learned):
    config = RunConfig(
        data=str(small_demo),
        clip="tiny",
        peft="iisan",
        groups=2,
        epochs_global=2,
        epochs_perpeft=2,
        lr=1e-3,
        weight_decay=1e-4,
    )
    load_run_inputs(config.resolved(), run_dataset(config), progress=False)  # builds the cache

    def refuse(*args, **kwargs):
        raise AssertionError("CLIP ran during IISAN training")

    monkeypatch.setattr(ClipEncoderLayer, "attended", refuse)
    run, metrics = train_new_run(config, tmp_path / "run", False, lambda line: None, progress=False)
    assert metrics["peft"] == "iisan" and metrics["perpeft"]["epochs"] == 2
    assert_learned(run.path)
    assert (run.path / "perpeft" / "best.safetensors").is_file()
