"""Gather one GPU check's results directory into ``gpu-check.json`` and ``gpu-check.md``, from whatever is there.

`gpu_check.sh` runs this after every step, every few seconds while a step runs, and once more when it is
stopped, so the directory always holds a report of everything measured so far. It reads what the script
leaves in ``RESULTS``: ``plan.tsv`` (step, planned time limit), ``status.tsv`` (one row when a step starts,
``running``, and one when it ends: step, status, exit code, seconds, time limit, start time; the last row
of a step counts), ``env.json``, each Python step's ``steps/NAME.json`` (saved after every figure, so a step
stopped by its time limit keeps the figures it measured, and says it is not ``complete``), the pytest steps'
JSON lines (``kernel-tests.jsonl``, ``benchmarks.jsonl``: one line per finished test, see
`benchmarks.gpu.pytest_lines`) or, for older results, the JUnit XML and pytest-benchmark JSON, the
compiled-kernel count, and each step's log (``logs/NAME.log``, streamed as the step runs: its last lines
go into the report for every step that did not pass).

A planned step without a row yet is ``pending`` (``not-run`` with ``--final``: the script ended before it).
Every figure carries the device name. Exits 1 unless every step passed (smoke runs: steps skipped as
GPU-only count as passed).

Run: ``python -m benchmarks.gpu.report RESULTS [--final]``; ``--every S`` rewrites it every S seconds.
"""

import argparse
import json
import os
import signal
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from . import SMOKE_NOTE

PASSED = ("passed", "skipped-smoke")
LOG_TAIL_LINES = 12


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` then rename: a report written while another is read is never torn."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_plan(path: Path) -> list[dict[str, Any]]:
    """``plan.tsv``: the steps the script means to run, in order, each with its planned time limit."""
    plan = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1].strip().isdigit():
            plan.append({"name": fields[0], "limit_s": int(fields[1])})
    return plan


def read_status(path: Path, now: float | None = None) -> list[dict[str, Any]]:
    """``status.tsv``: one entry per step in the order they started, each from its last row. A ``running``
    step's seconds are counted up to ``now``. Rows cut short (a write under way) are left out."""
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        fields = line.split("\t")
        if len(fields) not in (5, 6):
            continue
        try:
            name, status = fields[0], fields[1]
            row = {"name": name, "status": status, "rc": int(fields[2]), "seconds": float(fields[3])}
            row["limit_s"] = int(fields[4])
            started = float(fields[5]) if len(fields) == 6 else None
        except ValueError:
            continue
        if started is not None:
            row["started_unix"] = started
            if status == "running":
                row["seconds"] = round((now if now is not None else time.time()) - started, 1)
        rows[name] = row
    return list(rows.values())


def figure(name: str, value: Any, unit: str, device: str, note: str = "") -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "device": device, "note": note}


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a pytest run wrote so far (`pytest_lines`); a last line cut short is left out."""
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def test_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Outcomes of the tests that finished, the number collected, and whether the run ended."""
    tests = [record for record in records if record.get("event") == "test"]
    session = next((record for record in records if record.get("event") == "session"), {})
    finish = next((record for record in records if record.get("event") == "finish"), None)
    outcomes: dict[str, int] = {}
    for record in tests:
        outcomes[record.get("outcome", "?")] = outcomes.get(record.get("outcome", "?"), 0) + 1
    return {
        "tests": tests,
        "collected": session.get("collected"),
        "header": session.get("header", []),
        "finished": finish is not None,
        "exitstatus": finish.get("exitstatus") if finish else None,
        "outcomes": outcomes,
    }


def kernel_test_figures(results: Path, device: str) -> list[dict[str, Any]]:
    """Counts of the kernel tests (from their JSON lines, else the JUnit XML), the mode they ran in, the
    tests that failed, and how many kernels Triton compiled."""
    lines = results / "kernel-tests.jsonl"
    rows: list[dict[str, Any]] = []
    if lines.is_file():
        counts = test_counts(read_lines(lines))
        outcomes = counts["outcomes"]
        done = sum(outcomes.values())
        collected = counts["collected"]
        partial = "" if counts["finished"] else f"; the run stopped after {done} of {collected or '?'} tests"
        failed = [test for test in counts["tests"] if test.get("outcome") in ("failed", "error")]
        rows += [
            figure("kernel tests passed", outcomes.get("passed", 0), f"of {collected or '?'}", device, partial[2:]),
            figure("kernel tests failed + errors", len(failed), "", device),
            figure("kernel tests skipped", outcomes.get("skipped", 0), "", device),
        ]
        for line in counts["header"]:
            if line.startswith("perpeft kernels: "):
                rows.append(figure("kernel tests kernel_mode", line.removeprefix("perpeft kernels: "), "", device))
        for test in failed[:10]:
            rows.append(figure(f"FAILED {test['nodeid']}", test.get("message", ""), "", device))
    elif (results / "kernel-tests.xml").is_file():
        suite = ElementTree.parse(results / "kernel-tests.xml").getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        rows += [
            figure("kernel tests passed", passed, f"of {counts['tests']}", device),
            figure("kernel tests failed + errors", counts["failures"] + counts["errors"], "", device),
            figure("kernel tests skipped", counts["skipped"], "", device),
        ]
        for prop in suite.iter("property"):
            rows.append(figure(f"kernel tests {prop.get('name')}", prop.get("value"), "", device))
    compiled = results / "kernel-tests.cubins"
    if compiled.is_file() and compiled.read_text().strip().isdigit():
        rows.append(figure("Triton kernels compiled (cubin files)", int(compiled.read_text().strip()), "", device))
    return rows


def benchmark_figures(results: Path, device: str) -> list[dict[str, Any]]:
    """Min and median seconds of each CUDA benchmark, and its scalar ``extra_info`` (ratios, goals): from
    the JSON lines (every benchmark that finished), else pytest-benchmark's JSON (a run that ended)."""
    lines = results / "benchmarks.jsonl"
    rows = []
    if lines.is_file():
        counts = test_counts(read_lines(lines))
        benches = [test["benchmark"] for test in counts["tests"] if "benchmark" in test]
        outcomes = counts["outcomes"]
        partial = "" if counts["finished"] else "the run stopped before its end"
        rows.append(
            figure("benchmarks run", len(benches), f"of {counts['collected'] or '?'} selected", device, partial)
        )
        rows += [
            figure(f"FAILED {test['nodeid']}", test.get("message", ""), "", device)
            for test in counts["tests"]
            if test.get("outcome") in ("failed", "error")
        ]
        if outcomes.get("skipped"):
            rows.append(figure("benchmarks skipped", outcomes["skipped"], "", device))
    else:
        data = read_json(results / "benchmarks.json")
        benches = data["benchmarks"] if data else []
    for bench in benches:
        stats = bench["stats"]
        name = bench["fullname"].split("::")[-1]
        rows.append(
            figure(
                f"{name} min", stats["min"], "s", device, f"median {stats['median']:.6g} s, {stats['rounds']} rounds"
            )
        )
        for key, value in sorted(bench.get("extra_info", {}).items()):
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                rows.append(figure(f"{name} {key}", value, "", device))
    return rows


def step_figures(results: Path, name: str, device: str) -> tuple[list[dict[str, Any]], dict[str, Any], bool | None]:
    """A step's figures, details, and whether it completed (None: not a Python step's JSON)."""
    if name == "kernel-tests":
        return kernel_test_figures(results, device), {}, None
    if name == "cuda-benchmarks":
        return benchmark_figures(results, device), {}, None
    record = read_json(results / "steps" / f"{name}.json")
    if not record:
        return [], {}, None
    return record.get("figures", []), record.get("details", {}), bool(record.get("complete"))


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last non-blank lines of a log, each cut at the last carriage return (a progress bar's last state)."""
    if not path.is_file():
        return ""
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - 64_000))
        text = file.read().decode(errors="replace")
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join([line for line in kept if line.strip()][-lines:])


def cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(record: dict[str, Any]) -> str:
    env = record["env"] or {}
    versions = env.get("versions", {})
    state = "" if record["final"] else " — IN PROGRESS (or the check was killed)"
    lines = [
        f"# GPU check: {record['device']}{' (SMOKE: not GPU figures)' if record['smoke'] else ''}{state}",
        "",
        f"Started {record['started']}, {record['total_s']:.0f} s in all (budget {record['budget_s']} s). "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + (f"; CUDA {env.get('cuda')}, NCCL {env.get('nccl')}, {env.get('cpus')} CPUs" if not record["smoke"] else ""),
    ]
    if record.get("interrupted"):
        lines += ["", f"**The check was stopped by {record['interrupted']}**: the steps below are what it had done."]
    lines += ["", "| step | status | seconds | limit | planned |", "| --- | --- | ---: | ---: | ---: |"]
    for step in record["steps"]:
        partial = " (partial figures)" if step.get("complete") is False and step["status"] != "running" else ""
        planned = step.get("planned_s", "")
        lines.append(
            f"| {step['name']} | {step['status']}{partial} | {step['seconds']:.1f} | {step['limit_s']} | {planned} |"
        )
    lines += ["", "| step | figure | value | unit | device | note |", "| --- | --- | ---: | --- | --- | --- |"]
    for step in record["steps"]:
        for row in step["figures"]:
            note = row["note"].replace(f"; {SMOKE_NOTE}", "").replace(SMOKE_NOTE, "")
            lines.append(
                f"| {step['name']} | {cell(row['name'])} | {cell(row['value'])} | {row['unit']} | {row['device']} | {cell(note)} |"
            )
    for step in record["steps"]:
        if step.get("details", {}).get("collectives_exercised") is False:
            lines += ["", f"{step['name']}: world size 1 (one GPU): the engine's collectives were not exercised."]
    failed = [step for step in record["steps"] if step["status"] not in PASSED and step["log_tail"]]
    for step in failed:
        lines += ["", f"**{step['name']}: {step['status']}** (exit {step['rc']}), last lines of its log:", "```"]
        lines += [step["log_tail"], "```"]
    if record["smoke"]:
        lines += ["", SMOKE_NOTE + "."]
    return "\n".join(lines) + "\n"


def build(results: Path, final: bool, now: float | None = None) -> tuple[list[dict[str, Any]], str]:
    """Every step (started ones, then planned ones not started) with its figures, and the device name."""
    env = read_json(results / "env.json")
    device = env["device"] if env else "unknown device"
    plan = read_plan(results / "plan.tsv")
    planned = {entry["name"]: entry["limit_s"] for entry in plan}
    rows = read_status(results / "status.tsv", now)
    seen = {row["name"] for row in rows}
    waiting = "not-run" if final else "pending"
    rows += [
        {"name": entry["name"], "status": waiting, "rc": -1, "seconds": 0.0, "limit_s": 0}
        for entry in plan
        if entry["name"] not in seen
    ]
    steps = []
    for row in rows:
        figures, details, complete = step_figures(results, row["name"], device)
        log = results / "logs" / f"{row['name']}.log"
        step = {**row, "figures": figures, "details": details, "log": str(log), "log_tail": log_tail(log)}
        if complete is not None:
            step["complete"] = complete
        if row["name"] in planned:
            step["planned_s"] = planned[row["name"]]
        steps.append(step)
    return steps, device


def write(args: argparse.Namespace) -> int:
    """Build the report from what ``args.results`` holds now and write it; 0 when every step passed."""
    steps, device = build(args.results, args.final)
    started, total_s = args.started, args.total_s
    if args.start_unix is not None:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(args.start_unix))
        total_s = round(time.time() - args.start_unix, 1)
    record = {
        "device": device,
        "smoke": args.smoke,
        "started": started,
        "total_s": total_s,
        "budget_s": args.budget_s,
        "final": args.final,
        "interrupted": args.interrupted or None,
        "plan": read_plan(args.results / "plan.tsv"),
        "env": read_json(args.results / "env.json"),
        "ok": bool(steps) and all(step["status"] in PASSED for step in steps) and not args.interrupted,
        "steps": steps,
    }
    write_atomic(args.results / "gpu-check.json", json.dumps(record, indent=2, default=str) + "\n")
    summary = markdown(record)
    write_atomic(args.results / "gpu-check.md", summary)
    if not args.quiet:
        print(summary)
    return 0 if record["ok"] else 1


def refresh(args: argparse.Namespace) -> int:
    """``--every S``: rewrite the report every S seconds, quietly, until SIGTERM or until the process that
    started this one is gone (the script was killed outright)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # a write under way is cleaned up
    parent = os.getppid()
    args.quiet = True
    while True:
        time.sleep(args.every)
        if os.getppid() != parent:
            return 0
        write(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--started", default="")
    parser.add_argument("--total-s", type=float, default=0.0)
    parser.add_argument("--start-unix", type=float, default=None, help="The check's start: sets --started, --total-s.")
    parser.add_argument("--budget-s", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--final", action="store_true", help="The script is done: planned steps not run are not-run.")
    parser.add_argument("--interrupted", default="", help="The signal that stopped the script, if one did.")
    parser.add_argument("--quiet", action="store_true", help="Write the files only; print nothing.")
    parser.add_argument("--every", type=float, default=None, help="Rewrite the report every so many seconds.")
    args = parser.parse_args(argv)
    return refresh(args) if args.every else write(args)


if __name__ == "__main__":
    raise SystemExit(main())
