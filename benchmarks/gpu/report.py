"""Gather one GPU check's results directory into ``gpu-check.json`` and ``gpu-check.md``.

Reads what `gpu_check.sh` left in ``RESULTS``: ``env.json``, ``status.tsv`` (step, status, exit code,
seconds, time limit), each Python step's ``steps/NAME.json``, the kernel tests' JUnit XML (with the
mode the kernel conftest recorded) and compiled-kernel count, and pytest-benchmark's JSON. Every figure
carries the device name. Exits 1 unless every step passed (smoke runs: steps skipped as GPU-only count
as passed).

Run: ``python -m benchmarks.gpu.report RESULTS``.
"""

import argparse
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from . import SMOKE_NOTE

PASSED = ("passed", "skipped-smoke")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def read_status(path: Path) -> list[dict[str, Any]]:
    """``status.tsv``: one row per step, in run order."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, status, code, seconds, limit = line.split("\t")
        rows.append({"name": name, "status": status, "rc": int(code), "seconds": float(seconds), "limit_s": int(limit)})
    return rows


def figure(name: str, value: Any, unit: str, device: str, note: str = "") -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "device": device, "note": note}


def kernel_test_figures(results: Path, device: str) -> list[dict[str, Any]]:
    """Counts from the kernel tests' JUnit XML, the mode they ran in, and how many kernels Triton compiled."""
    path = results / "kernel-tests.xml"
    if not path.is_file():
        return []
    suite = ElementTree.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    rows = [
        figure("kernel tests passed", passed, f"of {counts['tests']}", device),
        figure("kernel tests failed + errors", counts["failures"] + counts["errors"], "", device),
        figure("kernel tests skipped", counts["skipped"], "", device),
    ]
    for prop in suite.iter("property"):
        rows.append(figure(f"kernel tests {prop.get('name')}", prop.get("value"), "", device))
    compiled = results / "kernel-tests.cubins"
    if compiled.is_file():
        rows.append(figure("Triton kernels compiled (cubin files)", int(compiled.read_text().strip() or 0), "", device))
    return rows


def benchmark_figures(results: Path, device: str) -> list[dict[str, Any]]:
    """Min and median seconds of each CUDA benchmark, and its scalar ``extra_info`` (ratios, goals)."""
    data = read_json(results / "benchmarks.json")
    rows = []
    for bench in data["benchmarks"] if data else []:
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


def step_figures(results: Path, name: str, device: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if name == "kernel-tests":
        return kernel_test_figures(results, device), {}
    if name == "cuda-benchmarks":
        return benchmark_figures(results, device), {}
    record = read_json(results / "steps" / f"{name}.json")
    return (record["figures"], record["details"]) if record else ([], {})


def log_tail(path: Path, lines: int = 4) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(record: dict[str, Any]) -> str:
    env = record["env"] or {}
    versions = env.get("versions", {})
    lines = [
        f"# GPU check: {record['device']}{' (SMOKE: not GPU figures)' if record['smoke'] else ''}",
        "",
        f"Started {record['started']}, {record['total_s']:.0f} s in all (budget {record['budget_s']} s). "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + (f"; CUDA {env.get('cuda')}, NCCL {env.get('nccl')}, {env.get('cpus')} CPUs" if not record["smoke"] else ""),
        "",
        "| step | status | seconds | limit |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['limit_s']} |" for s in record["steps"]]
    lines += ["", "| step | figure | value | unit | device | note |", "| --- | --- | ---: | --- | --- | --- |"]
    for step in record["steps"]:
        for row in step["figures"]:
            note = row["note"].replace(f"; {SMOKE_NOTE}", "").replace(SMOKE_NOTE, "")
            lines.append(
                f"| {step['name']} | {cell(row['name'])} | {cell(row['value'])} | {row['unit']} | {row['device']} | {cell(note)} |"
            )
    failed = [step for step in record["steps"] if step["status"] not in PASSED]
    for step in failed:
        lines += ["", f"**{step['name']}: {step['status']}** (exit {step['rc']}), last lines of its log:", "```"]
        lines += [step["log_tail"], "```"]
    if record["smoke"]:
        lines += ["", SMOKE_NOTE + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--started", default="")
    parser.add_argument("--total-s", type=float, default=0.0)
    parser.add_argument("--budget-s", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    env = read_json(args.results / "env.json")
    device = env["device"] if env else "unknown device"
    steps = []
    for row in read_status(args.results / "status.tsv"):
        figures, details = step_figures(args.results, row["name"], device)
        log = args.results / "logs" / f"{row['name']}.log"
        steps.append({**row, "figures": figures, "details": details, "log": str(log), "log_tail": log_tail(log)})
    record = {
        "device": device,
        "smoke": args.smoke,
        "started": args.started,
        "total_s": args.total_s,
        "budget_s": args.budget_s,
        "env": env,
        "ok": bool(steps) and all(step["status"] in PASSED for step in steps),
        "steps": steps,
    }
    (args.results / "gpu-check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    summary = markdown(record)
    (args.results / "gpu-check.md").write_text(summary)
    print(summary)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
