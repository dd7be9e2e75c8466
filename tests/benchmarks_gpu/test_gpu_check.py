"""The prepared GPU check (benchmarks/gpu_check.sh) cannot rot: its no-GPU gate, every Python step's smoke
mode, the report, the sync-site capture and its step/epoch split, the CLI run's streaming and parsing, the
per-test JSON lines of the pytest steps, and the script's own orchestration (a step killed by its time
limit, the whole script stopped), all CPU-cheap."""

import importlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("common", "embed_check", "train_check", "sync_check", "encoder_compile_check", "cli_check", "report")
# A step that records one figure, says so, then hangs: what a timed-out step looks like to the script.
HANGING_STEP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from benchmarks.gpu.figures import Figures, dump_stacks_on_term
    dump_stacks_on_term()
    figures = Figures(sys.argv[1], "cpu (smoke)", True, Path(sys.argv[2]))
    figures.add("measured before the hang", 1.5, "s")
    print("hanging now", flush=True)
    time.sleep(120)
    """
)


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
    assert gpu.encoder_compile_check.main(["--smoke", "--out", str(steps / "encoder-compile.json")]) == 0
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
    so_far = gpu.cli_check.epochs_so_far(demo_run)
    assert {"global", "perpeft"} <= set(so_far) and all(so_far[name] for name in ("global", "perpeft"))
    assert gpu.cli_check.epochs_so_far(demo_run / "missing") == {}


def script(commands: str) -> list[str]:
    """bash running ``commands`` after sourcing gpu_check.sh --smoke (its set-up and functions, no steps):
    no minimum step time, no slack beyond a step's planned limit."""
    prelude = "source benchmarks/gpu_check.sh --smoke || exit 3; MIN_STEP_S=1; SLACK_FACTOR=1; "
    return ["bash", "-c", prelude + commands]


def script_env(results: Path) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "PERPEFT_GPU_CHECK_OUT": str(results)}


def hanging(name: str) -> str:
    """run_step NAME of `HANGING_STEP`, its figures in steps/NAME.json."""
    return f'run_step {name} "$PY" -c \'{HANGING_STEP}\' {name} "$RESULTS/steps/{name}.json"'


def test_a_step_killed_by_its_time_limit_keeps_its_log_and_figures(tmp_path: Path) -> None:
    results = tmp_path / "results"
    commands = f"plan_step hang 3; plan_step after 5; write_plan; {hanging('hang')}; write_report --final"
    done = subprocess.run(
        script(commands), cwd=ROOT, env=script_env(results), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpu_check: plan (budget 330 s, 10 s of it for the report): hang 3 s, after 5 s" in done.stdout
    assert "[hang] hanging now" in done.stdout  # streamed to the console, prefixed
    assert "== hang: timeout (exit 124" in done.stdout
    log = (results / "logs" / "hang.log").read_text()
    assert "hanging now" in log and "most recent call first" in log  # the stack printed at SIGTERM
    record = json.loads((results / "gpu-check.json").read_text())
    assert record["final"] and not record["ok"]
    assert record["plan"] == [{"name": "hang", "limit_s": 3}, {"name": "after", "limit_s": 5}]
    hang, after = record["steps"]
    assert (hang["name"], hang["status"], hang["rc"], hang["limit_s"]) == ("hang", "timeout", 124, 3)
    assert hang["complete"] is False
    assert [row["name"] for row in hang["figures"]] == ["measured before the hang"]
    assert "hanging now" in hang["log_tail"]
    assert (after["name"], after["status"]) == ("after", "not-run")
    summary = (results / "gpu-check.md").read_text()
    assert "| hang | timeout (partial figures) |" in summary and "**hang: timeout** (exit 124)" in summary
    assert "| hang | measured before the hang | 1.5 | s |" in summary


def test_a_stopped_check_still_reports_the_running_step(tmp_path: Path) -> None:
    """The device call's timeout stops the script: the running step is stopped, recorded as timed out with
    what it measured, and the report is final."""
    results = tmp_path / "results"
    commands = f"plan_step hang 60; plan_step after 20; write_plan; {hanging('hang')}; run_step after true"
    with (tmp_path / "console.txt").open("w") as console:
        process = subprocess.Popen(
            script(commands), cwd=ROOT, env=script_env(results), stdout=console, stderr=subprocess.STDOUT
        )
        figures = results / "steps" / "hang.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (figures.is_file() and json.loads(figures.read_text())["figures"]):
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 1
    output = (tmp_path / "console.txt").read_text()
    assert "gpu_check: stopped by SIGTERM" in output
    record = json.loads((results / "gpu-check.json").read_text())
    assert record["final"] and record["interrupted"] == "SIGTERM" and not record["ok"]
    hang, after = record["steps"]
    assert (hang["status"], hang["rc"]) == ("timeout", 143)
    assert [row["name"] for row in hang["figures"]] == ["measured before the hang"]
    assert after["status"] == "not-run"
    assert "hanging now" in (results / "logs" / "hang.log").read_text()
    assert "**The check was stopped by SIGTERM**" in (results / "gpu-check.md").read_text()


def test_pytest_lines_survive_a_killed_run_and_feed_the_report(gpu: SimpleNamespace, tmp_path: Path) -> None:
    tests = tmp_path / "test_kernels.py"
    tests.write_text(
        textwrap.dedent(
            """
            import time
            import pytest

            def test_passes():
                pass

            def test_fails():
                assert 1 == 2, "wrong"

            @pytest.mark.skip(reason="not here")
            def test_skipped():
                pass

            def test_hangs():
                time.sleep(120)
            """
        )
    )
    lines = tmp_path / "results" / "kernel-tests.jsonl"
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(tests),
        "-p",
        "no:cacheprovider",
        "-p",
        "benchmarks.gpu.pytest_lines",
    ]
    command += [f"--lines-out={lines}", f"--rootdir={tmp_path}", "-c", os.devnull]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not lines.is_file() or lines.read_text().count('"event": "test"') < 3):
        time.sleep(0.2)
    process.terminate()  # as the step's timeout does
    process.wait(timeout=30)
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert records[0]["event"] == "session" and records[0]["collected"] == 4
    outcomes = {record["nodeid"].split("::")[-1]: record["outcome"] for record in records[1:]}
    assert outcomes == {"test_passes": "passed", "test_fails": "failed", "test_skipped": "skipped"}
    rows = {row["name"]: row for row in gpu.report.kernel_test_figures(lines.parent, "cpu (smoke)")}
    assert rows["kernel tests passed"]["value"] == 1 and rows["kernel tests passed"]["unit"] == "of 4"
    assert "stopped after 3 of 4 tests" in rows["kernel tests passed"]["note"]
    assert rows["kernel tests failed + errors"]["value"] == 1
    assert "wrong" in next(row["value"] for name, row in rows.items() if name.startswith("FAILED"))


def test_report_reads_benchmark_lines(gpu: SimpleNamespace, tmp_path: Path) -> None:
    bench = {"fullname": "benchmarks/test_kernels_bench.py::test_bce_cuda[fused]", "extra_info": {"peak_bytes": 7}}
    bench["stats"] = {"min": 1e-4, "median": 1.2e-4, "rounds": 100}
    lines = [
        {"event": "session", "collected": 3, "header": []},
        {"event": "test", "nodeid": bench["fullname"], "outcome": "passed", "benchmark": bench},
    ]
    (tmp_path / "benchmarks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"event": "te')
    rows = {row["name"]: row for row in gpu.report.benchmark_figures(tmp_path, "NVIDIA H100")}
    assert rows["benchmarks run"]["value"] == 1 and rows["benchmarks run"]["unit"] == "of 3 selected"
    assert rows["benchmarks run"]["note"] == "the run stopped before its end"
    assert rows["test_bce_cuda[fused] min"]["value"] == 1e-4
    assert rows["test_bce_cuda[fused] peak_bytes"]["value"] == 7


def test_report_shows_running_and_pending_steps(gpu: SimpleNamespace, tmp_path: Path) -> None:
    """A report rebuilt while a step runs (or after a SIGKILL): the step is running, the rest pending."""
    (tmp_path / "plan.tsv").write_text("env\t15\nsync\t30\ntrain\t40\n")
    started = time.time() - 12
    (tmp_path / "status.tsv").write_text(
        f"env\trunning\t-1\t0\t15\t{started}\nenv\tpassed\t0\t2.0\t15\t{started}\n"
        f"sync\trunning\t-1\t0\t30\t{started + 2}\nsync\tpass"  # a row being written
    )
    assert gpu.report.main([str(tmp_path), "--smoke", "--quiet"]) == 1
    steps = {step["name"]: step for step in json.loads((tmp_path / "gpu-check.json").read_text())["steps"]}
    assert steps["env"]["status"] == "passed" and steps["sync"]["status"] == "running"
    assert 9 < steps["sync"]["seconds"] < 60 and steps["sync"]["planned_s"] == 30
    assert steps["train"]["status"] == "pending"
    assert "IN PROGRESS" in (tmp_path / "gpu-check.md").read_text()

    # The script's refresher: the same report every so often, until SIGTERM, leaving no temporary file.
    (tmp_path / "gpu-check.json").unlink()
    command = [sys.executable, "-m", "benchmarks.gpu.report", str(tmp_path), "--every", "0.2", "--start-unix", "0"]
    refresher = subprocess.Popen(command, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (tmp_path / "gpu-check.json").is_file():
        time.sleep(0.1)
    refresher.terminate()
    assert refresher.wait(timeout=30) == 0
    assert json.loads((tmp_path / "gpu-check.json").read_text())["started"] == "1970-01-01T00:00:00Z"
    assert not list(tmp_path.glob(".*.tmp"))


def test_sync_splits_step_syncs_from_the_epoch_read(gpu: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Syncs under train_epoch's loop are step syncs (they fail a case); the rest of train_epoch is the
    epoch's read; a sync raised inside the real train_epoch's step is found there."""
    sync = gpu.sync_check
    assert sync.STEP_LINES, "train_epoch has no loop to tell steps by"
    loop = sync.STEP_LINES[0]

    def frames(line: int) -> list[traceback.FrameSummary]:
        return [traceback.FrameSummary(sync.EPOCH_FILE, line, "train_epoch"), traceback.FrameSummary("x.py", 1, "op")]

    assert sync.phase_of(frames(loop.start + 1)) == "step"
    assert sync.phase_of(frames(loop.stop + 50)) == "epoch"
    assert sync.phase_of([traceback.FrameSummary("x.py", 1, "op")]) == "-"

    modes = {"mode": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.update(mode=mode))

    class Syncing(torch.nn.Module):
        """A model whose step synchronises (as a CUDA step reading a device value on the host would)."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, batch: object, device: torch.device) -> torch.Tensor:
            if modes["mode"] == "error":
                raise RuntimeError(sync.SYNC_MESSAGE)
            if modes["mode"] == "warn":
                warnings.warn(sync.SYNC_MESSAGE, UserWarning, stacklevel=1)
            return self.weight * 2.0

    model = Syncing()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = torch.device("cpu")
    figures = gpu.common.Figures("sync", "cpu (test)", False, None)

    def step() -> None:
        sync.train_with_bars(model, optimizer, [None, None, None], cpu, "test")

    sync.check_case(figures, "syncing step", step, True, True, 3)
    values = {row["name"]: row["value"] for row in figures.figures}
    assert values["syncing step: synchronising ops in the steps (mode warn)"] == 3
    assert values["syncing step: first synchronising op (mode error)"].endswith("(step)")
    assert not figures.ok and "inside the training steps" in figures.details["failures"][0]
    site = figures.details["syncing step"]["sites"][0]
    assert site["phase"] == "step" and site["count"] == 3 and "forward" in site["call"]


def test_cli_watch_streams_and_records_epochs_as_they_come(gpu: SimpleNamespace, tmp_path: Path) -> None:
    cli = gpu.cli_check
    figures = gpu.common.Figures("nccl-ws1", "cpu (test)", False, tmp_path / "nccl.json")
    watch = cli.RunWatch(figures, tmp_path, time.perf_counter())
    watch.read(io.StringIO("starting\nNCCL version 2.21.5+cuda12.4\nstill going"))
    assert watch.nccl == "2.21.5+cuda12.4" and list(watch.tail)[-1] == "still going"
    watch.poll()  # no state.json yet
    state = {"global": {"history": [{"epoch": 1, "train_seconds": 2.5, "train_peak_bytes": 2**20}]}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    watch.poll()
    watch.poll()  # each epoch once
    saved = json.loads((tmp_path / "nccl.json").read_text())
    assert [row["name"] for row in saved["figures"]] == ["global epoch 1 train seconds", "global epoch 1 peak memory"]
    assert saved["complete"] is False
