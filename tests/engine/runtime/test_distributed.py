"""Data parallelism with torchrun on CPU (gloo, 2 processes on this machine)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from perpeft.cli.main import cli
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.distributed import World, join_process_group, rank_gpu
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.tensors import load_tensors
from perpeft.engine.serve.embed import embed_run
from perpeft.engine.serve.recommend import evaluate_run
from perpeft.engine.train.stages import rank_batches

WORKER = Path(__file__).with_name("ddp_worker.py")
BUILD_WORKER = Path(__file__).with_name("build_worker.py")
ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _run(command: list[str], timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_blocks_cover_the_work_in_rank_order() -> None:
    blocks = [World(rank, 3).block(10) for rank in range(3)]
    assert [list(block) for block in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    batches = list(range(5))
    dealt = [rank_batches(batches, World(rank, 2)) for rank in range(2)]
    assert dealt == [[0, 2, 4], [1, 3, 0]]  # same step count on both ranks; the list wraps around


@pytest.fixture(scope="module")
def two_rank_run(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's uninterrupted 2-rank run (one launch serves the tests below)."""
    out = tmp_path_factory.mktemp("two-rank")
    _run([*TORCHRUN, str(WORKER), str(small_demo), str(out)])
    return out


def test_two_rank_training_keeps_ranks_identical_after_every_step(two_rank_run: Path) -> None:
    ranks = [json.loads((two_rank_run / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert all(rank["size"] == 2 for rank in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert ranks[0]["max_difference"] == ranks[1]["max_difference"] == 0.0
    metrics = ranks[0]["metrics"]
    assert ranks[1]["metrics"] == metrics
    for stage in ("global", "perpeft"):
        assert 0.05 < metrics[stage]["test"]["HR@30"] <= 1.0
    # Only rank 0 wrote: one metrics file, one set of checkpoints.
    assert json.loads((two_rank_run / "run" / "metrics.json").read_text()) == metrics


def test_an_interrupted_two_rank_run_resumes_to_the_uninterrupted_metrics(
    small_demo: Path, two_rank_run: Path, tmp_path: Path
) -> None:
    cut = tmp_path / "cut"
    _run([*TORCHRUN, str(WORKER), str(small_demo), str(cut), "cut"])
    state = json.loads((cut / "run" / "state.json").read_text())
    assert state["global"]["completed_epochs"] == 1 and not (cut / "run" / "metrics.json").exists()
    _run([*TORCHRUN, str(WORKER), str(small_demo), str(cut), "resume"])
    expected = json.loads((two_rank_run / "run" / "metrics.json").read_text())
    assert json.loads((cut / "run" / "metrics.json").read_text()) == expected


def test_sharded_embed_and_evaluate_equal_one_process(demo_run: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    shutil.copytree(demo_run, single)
    embed_run(single, progress=False)
    expected_metrics = evaluate_run(single)

    sharded = tmp_path / "sharded"
    shutil.copytree(demo_run, sharded)
    # Started from the checkout's root (on every rank's sys.path) and from elsewhere: both load CLIP.
    _run([*TORCHRUN, "-m", "perpeft.cli", "--", "embed", "--run", str(sharded), "--quiet"], cwd=ROOT)
    for name in ("embedded_items", "embedded_users", "embedded_snapshot"):
        expected, _ = load_tensors(getattr(RunDirectory(single), name))
        actual, _ = load_tensors(getattr(RunDirectory(sharded), name))
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    result = _run([*TORCHRUN, "-m", "perpeft.cli", "--", "evaluate", "--run", str(sharded), "--json"], cwd=tmp_path)
    printed = json.loads(result.stdout)  # rank 0 alone prints
    for stage in ("valid", "test"):
        assert printed[stage] == pytest.approx(expected_metrics[stage], rel=1e-12, abs=1e-15)


def test_two_ranks_train_a_text_only_catalog(small_demo: Path, tmp_path: Path) -> None:
    """The vision tower never runs on a catalog without images (ml-100k as RecBole ships it), or with
    --no-image: its adapters must not exist, or DDP stops at the second step."""
    catalog = tmp_path / "text"
    catalog.mkdir()
    for name in ("shop.inter", "shop.item"):
        shutil.copy(small_demo / name, catalog / name.replace("shop", "text"))
    settings = ["--clip", "tiny", "--groups", "2", "--epochs-global", "1", "--epochs-perpeft", "1", "--quiet"]
    _run(
        [
            *TORCHRUN,
            "-m",
            "perpeft.cli",
            "--",
            "train",
            "--data",
            str(catalog),
            *settings,
            "--out",
            str(tmp_path / "run"),
        ]
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["text"], config["image"]) == (True, False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_killed_rank_ends_the_other_with_an_error_not_a_hang(small_demo: Path, tmp_path: Path) -> None:
    port = _free_port()
    command = [
        sys.executable, "-m", "perpeft.cli", "train", "--data", str(small_demo), "--clip", "tiny", "--groups", "2",
        "--epochs-global", "40", "--epochs-perpeft", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    ranks = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PERPEFT_DIST_TIMEOUT": "30",
        }
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    state = tmp_path / "run" / "state.json"
    deadline = time.monotonic() + 180
    while not state.is_file() and time.monotonic() < deadline and ranks[0].poll() is None:
        time.sleep(0.2)
    assert state.is_file(), ranks[0].communicate(timeout=30)[1][-2000:]
    ranks[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        _, stderr = ranks[0].communicate(timeout=120)
    finally:
        for process in ranks:
            process.kill()
    waited = time.monotonic() - killed_at
    assert ranks[0].returncode == 1
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "rank 0/2: the process group failed" in lines[0], stderr[-2000:]
    assert waited < 60


def test_ranks_wait_for_a_cache_build_longer_than_the_collective_timeout(tmp_path: Path) -> None:
    """Rank 1 waits 6 s for rank 0's build under a 3 s collective timeout (NCCL's watchdog would abort it);
    a failed build, or a failed read on rank 1, still ends the other rank with one line naming it."""
    env = {**os.environ, "PERPEFT_DIST_TIMEOUT": "3"}
    result = subprocess.run(
        [*TORCHRUN, str(BUILD_WORKER), str(tmp_path), "6"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert [rank["result"] for rank in ranks] == ["built", "read"]
    assert ranks[0]["sum"] == ranks[1]["sum"] == 3.0
    assert ranks[0]["build error"] == "OSError: the image cache could not be written"
    assert ranks[1]["build error"] == (
        "InputError: rank 1: stopping because rank 0 failed (its error is in its output)"
    )
    assert ranks[0]["read error"] == ("InputError: rank 0: stopping because rank 1 failed (its error is in its output)")
    assert ranks[1]["read error"] == "OSError: the image cache could not be read"


FAKE_TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}


def test_each_rank_takes_the_gpu_of_its_local_rank() -> None:
    assert rank_gpu("cuda", {**FAKE_TORCHRUN, "LOCAL_RANK": "1"}) == 1
    assert rank_gpu("auto", {**FAKE_TORCHRUN, "LOCAL_RANK": "1"}) == 1
    # One rank per machine (e.g. two nodes of one GPU each): --device cuda:N names that machine's GPU.
    assert rank_gpu("cuda:1", {**FAKE_TORCHRUN, "LOCAL_WORLD_SIZE": "1"}) == 1
    assert rank_gpu("cuda:1", {**FAKE_TORCHRUN, "WORLD_SIZE": "1"}) == 1
    for environ in (FAKE_TORCHRUN, {**FAKE_TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}):
        with pytest.raises(InputError, match=r"^--device cuda:1 under torchrun: .*pass --device cuda or auto"):
            rank_gpu("cuda:1", environ)


def test_an_explicit_gpu_under_torchrun_is_refused_before_joining(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environ = {**FAKE_TORCHRUN, "MASTER_PORT": str(_free_port()), "PERPEFT_DIST_TIMEOUT": "5"}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match="--device cuda:0 under torchrun"):
        join_process_group("cuda:0")
    assert not dist.is_initialized()
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path), "--device", "cuda:1", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: --device cuda:1 under torchrun: each of the 2 ranks"), lines[0]
    assert not dist.is_initialized()
