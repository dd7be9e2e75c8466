"""Input caches at real scale: build and read the token/pixel cache for 20,000 synthetic 500×500 JPEG items.

Run: ``pytest benchmarks/test_inputs_bench.py --benchmark-enable -s``. The build is timed once (it is
what a user pays once per catalog); reading random training-sized batches from the memory-mapped cache is
timed over many rounds. A CLIP-sized tokenizer stand-in (77 tokens) keeps the text side realistic.
"""

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perpeft.engine.data.dataset import Dataset
from perpeft.engine.features.inputs import load_item_inputs

ITEMS = int(os.environ.get("PERPEFT_BENCH_ITEMS", "20000"))
IMAGE_SIZE = 224
TOKENS = 77


def tokenize(titles: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(titles), TOKENS), dtype=np.int64)
    for row, title in enumerate(titles):
        words = [1 + (hash(word) % 49000) for word in title.split()][: TOKENS - 2]
        ids[row, : len(words) + 2] = [49406, *words, 49407]
    return ids, (ids != 0).astype(np.int64)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("catalog")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (500, 500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(base).save(buffer, format="JPEG", quality=85)
    template = buffer.getvalue()
    paths = []
    for item in range(1, ITEMS + 1):
        path = images / f"{item}.jpg"
        # Distinct files of realistic size; decoding cost is what matters, not pixel content.
        path.write_bytes(template)
        paths.append(path)
    titles = [f"synthetic product {item} with a title of several words" for item in range(1, ITEMS + 1)]
    return Dataset(
        "bench", root, [None, *map(str, range(1, ITEMS + 1))], ["", *titles], [None, *paths], [None], [np.empty(0)]
    )


def test_build_input_cache(benchmark, catalog: Dataset, tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("PERPEFT_CACHE", str(tmp_path_factory.mktemp("cache")))
    started = time.perf_counter()
    inputs = benchmark.pedantic(
        load_item_inputs, args=(catalog, tokenize, "bench-77", IMAGE_SIZE), kwargs={"progress": False}, rounds=1
    )
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in Path(inputs.directory).iterdir())
    benchmark.extra_info.update(items=ITEMS, seconds=seconds, items_per_second=ITEMS / seconds, cache_bytes=size)
    assert inputs.pixels.shape == (ITEMS + 1, 3, IMAGE_SIZE, IMAGE_SIZE)

    # Reading: 200 random batches of 300 items (a training step's distinct items), from the memory map.
    rng = np.random.default_rng(1)
    batches = [torch.from_numpy(rng.integers(1, ITEMS + 1, 300)) for _ in range(200)]
    started = time.perf_counter()
    for items in batches:
        inputs.batch(items, torch.device("cpu"))
    read = (time.perf_counter() - started) / len(batches)
    benchmark.extra_info.update(read_seconds_per_300_item_batch=read)
    print(
        f"\nbuild {seconds:.1f} s ({ITEMS / seconds:.0f} items/s), cache {size / 2**30:.2f} GiB, read {read * 1e3:.1f} ms per 300-item batch"
    )
