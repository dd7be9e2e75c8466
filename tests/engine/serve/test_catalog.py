"""Items added without retraining (`add_items`): their rows are the multimodal term of every group, the
serving run takes them in (fresh or grown), each version is published whole, bad input is refused."""

import dataclasses
import json
import shutil
import threading
import types
from pathlib import Path

import pytest
import torch

from perpeft.engine.data.sources import run_dataset
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.tensors import load_tensors, save_tensors
from perpeft.engine.serve import catalog as catalog_module
from perpeft.engine.serve.catalog import add_items, read_catalog
from perpeft.engine.serve.embed import embed_run, load_embeddings
from perpeft.engine.serve.recommend import Query, ServingRun
from perpeft.engine.train.pipeline import train_new_run

HEADER = "item_id:token\ttitle:token_seq"


@pytest.fixture
def run(embedded_copy: Path) -> Path:
    return embedded_copy


def test_an_added_item_is_the_multimodal_term_of_each_group(run, tmp_path, item_copies):
    rows = [1, 5, 17]
    item_file, ids = item_copies(run, tmp_path / "new", rows)
    catalog, added = add_items(run, item_file, progress=False)
    assert added == 3 and catalog.version == 1 and [item.id for item in catalog.items] == ids
    directory = RunDirectory.open(run)
    embeddings = load_embeddings(directory)
    # Same title and image as the trained item: z without the trained item's ID embedding h.
    for table, trained, checkpoint in (
        (catalog.tables, embeddings.items, directory.best_checkpoint("perpeft")),
        (catalog.snapshot, embeddings.snapshot, directory.snapshot),
    ):
        ids_table = load_tensors(checkpoint)[0]["recommender.item_embeddings.weight"]
        expected = trained[:, rows] - ids_table[rows]
        assert table.shape == expected.shape
        torch.testing.assert_close(table, expected, rtol=0, atol=1e-5)


def test_serving_takes_in_added_items_and_growing_equals_reopening(run, tmp_path, item_copies):
    before = ServingRun.open(run)
    first, first_ids = item_copies(run, tmp_path / "first", [2, 3])
    add_items(run, first, progress=False)
    after_first = ServingRun.open(run)
    assert after_first.catalog.version == 1
    assert after_first.dataset.num_items == before.dataset.num_items + 2
    assert after_first.embeddings.items.shape[1] == before.embeddings.items.shape[1] + 2
    # Known users' vectors read only trained items: unchanged.
    assert torch.equal(after_first.known_vectors, before.known_vectors)
    second, second_ids = item_copies(run, tmp_path / "second", [4], prefix="later")
    add_items(run, second, progress=False)
    grown = after_first.with_catalog(read_catalog(RunDirectory.open(run)))
    reopened = ServingRun.open(run)
    assert grown.catalog.version == reopened.catalog.version == 2
    everything = before.dataset.num_items + 3
    queries = [
        Query(user=before.dataset.user_ids[7], k=everything),
        Query(history=[first_ids[0], second_ids[0]], k=5, exclude=[first_ids[1]]),
        Query(history=[before.dataset.item_ids[9]], k=everything),
    ]
    assert grown.recommend(queries) == reopened.recommend(queries)
    # With k covering the catalog, the added items are ranked like any other.
    ranked = reopened.recommend(queries[:1])[0].items
    assert set(first_ids + second_ids) <= set(ranked)
    # The run grown from is left serving the version it had.
    served_before = after_first.recommend(queries[:1])[0].items
    assert set(first_ids) <= set(served_before) and not set(second_ids) & set(served_before)
    # A catalog that rewrote what was served (not append-only) is refused, not half-applied.
    rewritten = read_catalog(RunDirectory.open(run))
    rewritten = dataclasses.replace(rewritten, items=rewritten.items[::-1])
    with pytest.raises(InputError, match="the added items changed, not grew"):
        after_first.with_catalog(rewritten)


def test_readers_see_only_whole_versions_while_items_are_added(run, tmp_path, item_copies):
    files = [item_copies(run, tmp_path / f"batch{n}", [n + 1, n + 2], prefix=f"b{n}x")[0] for n in range(2)]
    directory = RunDirectory.open(run)
    seen: list[tuple[int, int, int]] = []
    errors: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                catalog = read_catalog(directory)
            except Exception as error:  # any failure is what the test looks for
                errors.append(error)
                return
            seen.append((catalog.version, len(catalog.items), catalog.tables.shape[1]))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for item_file in files:
            add_items(run, item_file, progress=False)
    finally:
        done.set()
        reader.join()
    assert not errors and seen  # read all along the two additions, and never a failure
    assert set(seen) <= {(0, 0, 0), (1, 2, 2), (2, 4, 4)}
    final = read_catalog(directory)
    assert (final.version, len(final.items), final.tables.shape[1]) == (2, 4, 4)


def test_embed_overwrite_keeps_added_items(run, tmp_path, item_copies):
    item_file, ids = item_copies(run, tmp_path / "new", [6])
    add_items(run, item_file, progress=False)
    embed_run(run, overwrite=True, progress=False)
    assert [item.id for item in ServingRun.open(run).catalog.items] == ids


def test_refusals(run, tmp_path, item_copies):
    directory = RunDirectory.open(run)
    dataset = run_dataset(directory.config)
    item_file, ids = item_copies(run, tmp_path / "new", [1, 2])

    trained_id = tmp_path / "trained" / "trained.item"
    trained_id.parent.mkdir()
    trained_id.write_text(f"{HEADER}\n{dataset.item_ids[3]}\tsomething\n")
    with pytest.raises(InputError, match=rf"{trained_id}: already in the run's catalog: '{dataset.item_ids[3]}'"):
        add_items(run, trained_id, progress=False)

    add_items(run, item_file, progress=False)
    with pytest.raises(InputError, match=rf"already in the run's catalog: '{ids[0]}', '{ids[1]}'"):
        add_items(run, item_file, progress=False)

    no_images = tmp_path / "bare" / "bare.item"
    no_images.parent.mkdir()
    no_images.write_text(f"{HEADER}\nfresh\tSome title\n")
    with pytest.raises(
        InputError,
        match=r"bare.item: the added items have no images \(no images/ beside the file\); the run encodes images",
    ):
        add_items(run, no_images, progress=False)

    declared, declared_ids = item_copies(run, tmp_path / "declared", [4, 5], prefix="d")
    (declared.parent / "images" / f"{declared_ids[1]}.png").unlink(missing_ok=True)
    (declared.parent / "images" / f"{declared_ids[1]}.jpg").unlink(missing_ok=True)
    (declared.parent / "missing_images.txt").write_text(f"{declared_ids[1]}\n")
    with pytest.raises(InputError, match=f"item '{declared_ids[1]}' lacks its image or text.*no placeholder"):
        add_items(run, declared, progress=False)

    assert read_catalog(directory).version == 1  # nothing refused was published

    save_tensors(directory.embedded_addition(1), {"items": torch.zeros(2, 5, 32), "snapshot": torch.zeros(1, 2, 32)})
    with pytest.raises(InputError, match=r"0001.safetensors: items is \[2, 5, 32\], but 2 added items need"):
        ServingRun.open(run)
    directory.embedded_catalog.write_text(json.dumps({"version": 3, "additions": []}))
    with pytest.raises(InputError, match=r"catalog.json: not a catalog that `embed --add-items` wrote"):
        ServingRun.open(run)


def test_item_id_methods_process_groups_and_runs_without_embeddings_are_refused(
    run, tmp_path, item_copies, monkeypatch
):
    item_file, _ = item_copies(run, tmp_path / "new", [1])
    with monkeypatch.context() as patch:
        patch.setattr(catalog_module, "current_world", lambda: types.SimpleNamespace(alone=False))
        with pytest.raises(InputError, match="runs in one process: start it without torchrun"):
            add_items(run, item_file, progress=False)
    directory = RunDirectory.open(run)
    shutil.rmtree(directory.embeddings)
    with pytest.raises(InputError, match="no embeddings; compute them first"):
        add_items(run, item_file, progress=False)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "method": "wo-mm"}))
    with pytest.raises(InputError, match="scores items by their ID embeddings alone"):
        add_items(run, item_file, progress=False)


@pytest.mark.parametrize("peft", ["ia3", "iisan"])
def test_other_pefts_add_items_the_same_way(peft, small_demo, small_config, tmp_path, item_copies):
    trained, _ = train_new_run(small_config(small_demo, peft=peft), tmp_path / "run", False, lambda line: None, False)
    embed_run(trained.path, progress=False)
    rows = [2, 9]
    item_file, ids = item_copies(trained.path, tmp_path / "new", rows)
    catalog, _ = add_items(trained.path, item_file, progress=False)
    ids_table = load_tensors(trained.best_checkpoint("perpeft"))[0]["recommender.item_embeddings.weight"]
    expected = load_embeddings(trained).items[:, rows] - ids_table[rows]
    torch.testing.assert_close(catalog.tables, expected, rtol=0, atol=1e-5)
    assert ServingRun.open(trained.path).recommend([Query(history=ids, k=3)])[0].items


def test_approximate_serving_grows_the_kept_graphs_of_the_trained_tables(run, tmp_path, item_copies):
    item_file, ids = item_copies(run, tmp_path / "new", [1, 2])
    add_items(run, item_file, progress=False)
    serving = ServingRun.open(run, "hnsw")
    assert serving.index.num_items == serving.dataset.num_items
    assert len(list(RunDirectory.open(run).search_graphs.glob("hnsw-*.faiss"))) == serving.groups
    answer = serving.recommend([Query(history=ids, k=10)])[0]
    assert len(answer.items) == 10 and not set(ids) & set(answer.items)
