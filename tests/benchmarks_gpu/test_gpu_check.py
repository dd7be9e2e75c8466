"""The prepared GPU check (benchmarks/gpu_check.sh) cannot rot: its no-GPU gate, every Python step's smoke
mode, the report, the sync-site capture and the CLI run's parsing, all CPU-cheap."""

import importlib
import json
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("common", "embed_check", "train_check", "sync_check", "cli_check", "report")


@pytest.fixture
def gpu() -> SimpleNamespace:
    """The ``benchmarks.gpu`` step modules; the torch thread count the smoke modes lower is restored afterwards."""
    threads = torch.get_num_threads()
    yield SimpleNamespace(**{name: importlib.import_module(f"benchmarks.gpu.{name}") for name in STEPS})
    torch.set_num_threads(threads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would run the whole check")
def test_script_says_it_needs_cuda_and_exits_2() -> None:
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "gpu_check: needs a CUDA GPU" in done.stderr
    assert "==" not in done.stdout  # no step started


def test_smoke_steps_and_report(gpu: SimpleNamespace, tmp_path: Path) -> None:
    steps = tmp_path / "steps"
    assert gpu.embed_check.main(["--smoke", "--out", str(steps / "embed.json")]) == 0
    assert gpu.train_check.main(["--smoke", "--out", str(steps / "train.json"), "--stage-seconds", "0.5"]) == 0
    assert gpu.sync_check.main(["--smoke", "--out", str(steps / "sync.json")]) == 0
    train = json.loads((steps / "train.json").read_text())
    assert train["device"] == "cpu (smoke)" and train["smoke"]
    assert {"Global PEFT", "PerPEFT (C = 8)"} <= set(train["details"])
    assert all("smoke run" in row["note"] for row in train["figures"])

    (tmp_path / "env.json").write_text(json.dumps({"device": "cpu (smoke)", "versions": {"torch": torch.__version__}}))
    status = "embed\tpassed\t0\t3.2\t60\ntrain\tpassed\t0\t5.0\t130\nsync\tpassed\t0\t2.0\t60\n"
    (tmp_path / "status.tsv").write_text(status + "kernel-tests\tskipped-smoke\t0\t0\t0\n")
    assert gpu.report.main([str(tmp_path), "--smoke"]) == 0
    summary = (tmp_path / "gpu-check.md").read_text()
    assert "| embed | passed |" in summary and "| train | Global PEFT epoch |" in summary
    record = json.loads((tmp_path / "gpu-check.json").read_text())
    assert all(row["device"] == "cpu (smoke)" for step in record["steps"] for row in step["figures"])

    (tmp_path / "status.tsv").write_text(status + "nccl-ws1\ttimeout\t124\t75.0\t75\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "nccl-ws1.log").write_text("hung here\n")
    assert gpu.report.main([str(tmp_path), "--smoke"]) == 1
    assert "**nccl-ws1: timeout** (exit 124)" in (tmp_path / "gpu-check.md").read_text()


def test_report_reads_kernel_tests_and_benchmarks(gpu: SimpleNamespace, tmp_path: Path) -> None:
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "versions": {}}))
    (tmp_path / "status.tsv").write_text("kernel-tests\tpassed\t0\t40.0\t90\ncuda-benchmarks\tpassed\t0\t50.0\t80\n")
    (tmp_path / "kernel-tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="57" failures="0" errors="0" skipped="1">'
        '<properties><property name="kernel_mode" value="Triton 3.9.0 compiled" /></properties>'
        "</testsuite></testsuites>"
    )
    (tmp_path / "kernel-tests.cubins").write_text("42\n")
    bench = {"fullname": "benchmarks/test_kernels_bench.py::test_bce_cuda[fused]", "extra_info": {"peak_bytes": 7}}
    bench["stats"] = {"min": 1e-4, "median": 1.2e-4, "rounds": 100}
    (tmp_path / "benchmarks.json").write_text(json.dumps({"benchmarks": [bench]}))
    assert gpu.report.main([str(tmp_path)]) == 0
    rows = {
        row["name"]: row
        for step in json.loads((tmp_path / "gpu-check.json").read_text())["steps"]
        for row in step["figures"]
    }
    assert rows["kernel tests passed"]["value"] == 56
    assert rows["kernel tests kernel_mode"]["value"] == "Triton 3.9.0 compiled"
    assert rows["Triton kernels compiled (cubin files)"]["value"] == 42
    assert rows["test_bce_cuda[fused] min"] == {
        "name": "test_bce_cuda[fused] min",
        "value": 1e-4,
        "unit": "s",
        "device": "NVIDIA H200",
        "note": "median 0.00012 s, 100 rounds",
    }


def test_sync_sites_are_found_with_their_call_sites(gpu: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU stand-in for CUDA's sync debug mode: a sync op warns (mode warn) or raises (mode error)."""
    sync = gpu.sync_check
    modes = {"mode": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.update(mode=mode))

    def synchronising_op() -> None:
        if modes["mode"] == "error":
            raise RuntimeError(sync.SYNC_MESSAGE)
        warnings.warn(sync.SYNC_MESSAGE, UserWarning, stacklevel=1)

    def step() -> None:
        for _ in range(2):
            synchronising_op()

    sites = sync.all_syncs(step)
    ((site, count),) = sites.items()
    assert count == 2 and "synchronising_op" in site.call and site.project == "-"
    first = sync.first_sync(step)
    assert first is not None and "synchronising_op: raise RuntimeError" in first.call
    assert sync.first_sync(lambda: None) is None and not sync.all_syncs(lambda: None)
    assert modes["mode"] == 0


def test_cli_check_reads_nccl_and_the_run(gpu: SimpleNamespace, demo_run: Path) -> None:
    assert gpu.cli_check.nccl_version("x\nNCCL version 2.21.5+cuda12.4\n") == "2.21.5+cuda12.4"
    assert gpu.cli_check.nccl_version("gloo only") is None
    stages = gpu.cli_check.run_figures(demo_run)
    assert set(stages) == {"global", "perpeft"}
    assert all(len(values["train_seconds"]) >= 1 for values in stages.values())
