"""Item inputs are built once per (catalog, tokenizer, image size), reused, and training opens no image."""

import numpy as np
import pytest
from PIL import Image

from perpeft.engine.clip.loading import load_clip
from perpeft.engine.clip.preprocess import preprocess_image
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.demo import DemoSpec, generate_demo
from perpeft.engine.data.formats import load_recbole
from perpeft.engine.features import inputs as inputs_module
from perpeft.engine.features.inputs import load_item_inputs
from perpeft.engine.train.pipeline import train_new_run


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    spec = DemoSpec(num_domains=2, num_users=64, items_per_domain=16, min_seq_len=5, max_seq_len=7)
    return generate_demo(tmp_path_factory.mktemp("data") / "tiny", seed=5, spec=spec)


def test_cache_is_built_once_and_reused(small_demo, monkeypatch):
    dataset = load_recbole(small_demo)
    bundle = load_clip("tiny")
    first = load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress=False)
    monkeypatch.setattr(inputs_module, "_build_item_inputs", lambda *args: pytest.fail("cache rebuilt"))
    second = load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress=False)
    assert first.directory == second.directory
    assert isinstance(second.pixels, np.memmap)
    with Image.open(dataset.image_paths[3]) as image:
        np.testing.assert_array_equal(second.pixels[3], preprocess_image(image, bundle.image_size))
    assert second.pixels.dtype == np.uint8 and second.pixels.shape == (dataset.num_items + 1, 3, 32, 32)
    ids, _ = bundle.tokenizer([dataset.titles[3]])
    np.testing.assert_array_equal(second.input_ids[3], ids[0])


def test_changed_catalog_gets_a_new_cache(small_demo, tmp_path):
    dataset = load_recbole(small_demo)
    bundle = load_clip("tiny")
    original = load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress=False)
    dataset.titles[2] = dataset.titles[2] + " renamed"
    changed = load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress=False)
    assert changed.directory != original.directory


def test_training_never_opens_an_image(small_demo, tmp_path, monkeypatch):
    config = RunConfig(
        data=str(small_demo), clip="tiny", groups=2, epochs_global=1, epochs_perpeft=1, lr=1e-3, weight_decay=1e-4
    )
    dataset = load_recbole(small_demo)
    bundle = load_clip("tiny")
    load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("an image file was opened during training")

    monkeypatch.setattr(Image, "open", refuse)
    _, metrics = train_new_run(config, tmp_path / "run", False, lambda line: None, progress=False)
    assert metrics["perpeft"]["epochs"] == 1


@pytest.mark.parametrize("damage", ["cut short", "another catalog's meta"])
def test_a_damaged_cache_is_built_again(small_demo, damage, caplog):
    dataset = load_recbole(small_demo)
    bundle = load_clip("tiny")
    first = load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress=False)
    expected = np.array(first.pixels)
    if damage == "cut short":
        pixels = first.directory / "pixels.npy"
        pixels.write_bytes(pixels.read_bytes()[: pixels.stat().st_size // 2])
    else:
        (first.directory / "meta.json").write_text('{"dataset": "tiny", "items": 3, "image_size": 32}')
    again = load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress=False)
    np.testing.assert_array_equal(np.array(again.pixels), expected)
    warnings = [record.getMessage() for record in caplog.records if "damaged cache" in record.getMessage()]
    assert len(warnings) == 1 and str(first.directory) in warnings[0]
