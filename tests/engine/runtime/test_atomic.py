"""Atomic writes leave the target whole and nothing else behind, and honour the umask like any program's."""

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from perpeft.engine.data.demo import DemoSpec, generate_demo
from perpeft.engine.runtime.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    replace_directory,
    temporary_directory_beside,
)
from perpeft.engine.runtime.tensors import load_tensors, save_tensors
from perpeft.engine.serve.embed import embed_run
from perpeft.engine.train.pipeline import train_new_run


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process's umask set to ``request.param`` for one test."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of everything below it, by relative path."""
    paths = [root, *root.rglob("*")]
    return {str(path.relative_to(root)): stat.S_IMODE(path.lstat().st_mode) for path in paths}


def _expected(root: Path, mask: int) -> dict[str, int]:
    return {name: (0o777 if (root / name).is_dir() else 0o666) & ~mask for name in _modes(root)}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], indirect=True)
def test_written_files_and_directories_take_their_mode_from_the_umask(umask: int, tmp_path: Path) -> None:
    root = tmp_path / "out"
    atomic_write_bytes(root / "a.bin", b"x")
    atomic_write_json(root / "deeper" / "b.json", {"k": 1})
    save_tensors(root / "c.safetensors", {"w": torch.ones(2)})
    staged = temporary_directory_beside(root / "d")
    (staged / "inside.txt").write_text("y")
    replace_directory(staged, root / "d")
    assert _modes(root) == _expected(root, umask)
    assert _modes(root)["a.bin"] == {0o022: 0o644, 0o027: 0o640, 0o077: 0o600}[umask]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "t.safetensors"
    save_tensors(target, {"w": torch.zeros(3)})
    with pytest.raises(AttributeError):
        save_tensors(target, {"w": "not a tensor"})  # type: ignore[dict-item]
    torch.testing.assert_close(load_tensors(target)[0]["w"], torch.zeros(3))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["t.safetensors"]


def test_replacing_a_directory_swaps_it_whole(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new = temporary_directory_beside(target)
    (new / "new.txt").write_text("new")
    replace_directory(new, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    assert [path.name for path in target.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("umask", [0o027], indirect=True)
def test_a_whole_run_honours_the_umask(
    umask: int, tmp_path: Path, small_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Demo data, the input cache, the run's config, checkpoints, grouping, metrics and embeddings."""
    monkeypatch.setenv("PERPEFT_CACHE", str(tmp_path / "cache"))
    spec = DemoSpec(num_domains=2, num_users=40, items_per_domain=12, min_seq_len=5, max_seq_len=6)
    data = generate_demo(tmp_path / "data" / "shop", seed=5, spec=spec)
    run, _ = train_new_run(small_config(data), tmp_path / "runs" / "run", False, lambda line: None, False)
    embed_run(run.path, progress=False)
    for root in (tmp_path / "data", tmp_path / "cache", tmp_path / "runs"):
        modes = _modes(root)
        assert len(modes) > 3
        assert modes == _expected(root, umask), root
