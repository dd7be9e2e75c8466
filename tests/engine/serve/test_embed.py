"""`embed_run`: mixed-group tables equal the training-time per-group ones; user vectors; files; resume."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks.device_traffic import DEVICE, DeviceTraffic
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import last_window, leave_one_out
from perpeft.engine.errors import InputError
from perpeft.engine.model.run_inputs import load_run_inputs
from perpeft.engine.runtime.run_directory import EMBEDDINGS, RunDirectory
from perpeft.engine.runtime.tensors import load_tensors
from perpeft.engine.serve import embed as embed_module
from perpeft.engine.serve.embed import PartialChunks, embed_run, grouped_item_tables, load_embeddings, load_model


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def reference(demo_run) -> dict:
    """What training's evaluation computes: per-group item tables and test-step user vectors."""
    run = RunDirectory.open(demo_run)
    config = run.config
    run_inputs = load_run_inputs(config, run_dataset(config), progress=False)
    dataset = run_inputs.dataset
    model = load_model(run, run.best_checkpoint("perpeft"), config.groups, dataset.num_items, run_inputs)
    tables = model.item_tables(dataset.num_items, config.encode_batch_size)
    grouping = load_tensors(run.grouping)[0]
    windows = torch.from_numpy(last_window(leave_one_out(dataset.sequences).history("test"), config.maxlen))
    users = model.user_vectors(windows, grouping["assignment"], tables, config.eval_batch_size)
    return {"dataset": dataset, "tables": tables, "users": users, **grouping}


def test_each_item_s_inputs_go_to_the_device_once_for_all_its_groups(demo_run, reference):
    run = RunDirectory.open(demo_run)
    config = run.config
    run_inputs = load_run_inputs(config, run_dataset(config), progress=False)
    inputs, items = run_inputs.inputs, run_inputs.dataset.num_items
    model = load_model(run, run.best_checkpoint("perpeft"), config.groups, items, run_inputs).to(DEVICE)
    with DeviceTraffic() as traffic:
        grouped_item_tables(model, items, batch_size=10)
    assert config.groups == 2 and not traffic.blocking_copies
    # What comes back is each chunk's vectors, once (on CUDA without waiting: `HostCopy`, awaited a chunk later).
    (copy_back,) = traffic.syncs
    assert "device-to-host copy at engine/runtime/device.py" in copy_back
    assert traffic.syncs[copy_back] == -(-items // (10 // config.groups))
    pixels, tokens = inputs.pixels[0].nbytes, inputs.input_ids[0].nbytes + inputs.attention_mask[0].nbytes
    # Per item: its pixels and at most its full token row once, plus a few int64 ids (item, row, presence).
    assert items * pixels <= traffic.copied_bytes <= items * (pixels + tokens + 64)


def test_tables_users_and_files(demo_run, reference):
    # 10 pairs per pass: 5 items of both groups, and a last, shorter chunk.
    embeddings = embed_run(demo_run, batch_size=10, overwrite=True, progress=False)
    dataset = reference["dataset"]
    groups, items, width = 2, dataset.num_items, 32
    assert embeddings.items.shape == (groups, items + 1, width) and embeddings.items.dtype == torch.float32
    assert embeddings.users.shape == (dataset.num_users + 1, width) and embeddings.users.dtype == torch.float32
    assert embeddings.groups.dtype == torch.int64 and embeddings.centroids.shape == (groups, width)
    assert not embeddings.items[:, 0].any() and not embeddings.users[0].any()
    torch.testing.assert_close(embeddings.items, reference["tables"], rtol=0, atol=1e-6)
    torch.testing.assert_close(embeddings.users[1:], reference["users"][1:], rtol=1e-5, atol=1e-5)
    assert torch.equal(embeddings.groups, reference["assignment"])
    assert torch.equal(embeddings.centroids, reference["centroids"])

    on_disk = load_embeddings(RunDirectory.open(demo_run))
    for name in ("items", "users", "groups", "centroids"):
        assert torch.equal(getattr(on_disk, name), getattr(embeddings, name)), name
    ids = json.loads(RunDirectory(demo_run).embedded_ids.read_text())
    assert ids == {"users": dataset.user_ids, "items": dataset.item_ids}
    assert ids["users"][0] is None and ids["items"][0] is None
    assert not RunDirectory(demo_run).embedding_chunks.exists()


def test_existing_embeddings_need_overwrite(demo_run):
    embed_run(demo_run, overwrite=True, progress=False)
    with pytest.raises(InputError, match="--overwrite"):
        embed_run(demo_run, progress=False)


def test_resume_encodes_only_missing_chunks(demo_run, reference, monkeypatch):
    saved: list[Path] = []
    original = embed_module.save_tensors
    stop_after: list[int] = [3]

    def recording_save(path: Path, *args, **kwargs) -> None:
        if ".partial" in path.parts:
            if len(saved) == stop_after[0]:
                raise Interrupt
            saved.append(path)
        original(path, *args, **kwargs)

    monkeypatch.setattr(embed_module, "save_tensors", recording_save)
    with pytest.raises(Interrupt):
        embed_run(demo_run, batch_size=8, overwrite=True, progress=False)
    assert len(list(RunDirectory(demo_run).embedding_chunks.glob("chunk-*"))) == 3
    assert not any((demo_run / EMBEDDINGS).glob("*.safetensors"))

    saved.clear()
    stop_after[0] = -1
    embeddings = embed_run(demo_run, batch_size=8, progress=False)
    chunks = -(-2 * reference["dataset"].num_items // 8)
    assert len(saved) == chunks - 3
    torch.testing.assert_close(embeddings.items, reference["tables"], rtol=0, atol=1e-6)


def test_partial_chunks_of_another_fingerprint_are_discarded(tmp_path):
    first = PartialChunks(tmp_path / "partial", {"batch_size": 8})
    first.save(0, torch.ones(2, 3))
    assert torch.equal(PartialChunks(tmp_path / "partial", {"batch_size": 8}).load(0), torch.ones(2, 3))
    assert PartialChunks(tmp_path / "partial", {"batch_size": 16}).load(0) is None


def test_unfinished_run_is_refused(tmp_path):
    RunDirectory.create(tmp_path / "run", RunConfig(clip="tiny"), overwrite=False)
    with pytest.raises(InputError, match="not finished"):
        embed_run(tmp_path / "run", progress=False)
