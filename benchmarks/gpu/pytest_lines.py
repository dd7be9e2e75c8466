"""A pytest plugin that writes one JSON line per test as it finishes, so a run killed by its time limit
keeps every result before the kill (JUnit XML and pytest-benchmark's JSON are written only at the end).

Load it with ``-p benchmarks.gpu.pytest_lines --lines-out FILE`` (no conftest needed). Lines, in order:

- ``{"event": "session", "collected": N, "header": [...]}`` once collection is done: the count and the
  report-header lines of every plugin and conftest (the kernel tests' ``perpeft kernels: …`` mode);
- ``{"event": "test", "nodeid", "outcome", "duration", "message"}`` after each test's teardown; outcome is
  passed, failed, error (setup or teardown failed), skipped, xfailed or xpassed; ``message`` the first
  line of the failure or skip reason; a pytest-benchmark test adds ``"benchmark"`` (``fullname``, ``stats``
  min/median/mean/rounds/iterations, scalar ``extra_info``), pytest-benchmark's own JSON layout;
- ``{"event": "finish", "exitstatus": N}`` when the session ends normally.

It also makes SIGTERM print every thread's stack (the timeout then shows where a test hung).
"""

import json
import time
from pathlib import Path
from typing import Any

import pytest

from .figures import dump_stacks_on_term

LINES = pytest.StashKey[Any]()
OUTCOMES = pytest.StashKey[dict[str, dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lines-out", default=None, help="Append one JSON line per finished test to this file.")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--lines-out")
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    config.stash[LINES] = open(path, "a", buffering=1)  # noqa: SIM115 - closed in pytest_unconfigure
    config.stash[OUTCOMES] = {}
    dump_stacks_on_term()


def write(config: pytest.Config, record: dict[str, Any]) -> None:
    file = config.stash.get(LINES, None)
    if file is not None:
        file.write(json.dumps({**record, "time": round(time.time(), 3)}, default=str) + "\n")
        file.flush()


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if LINES not in config.stash:
        return
    header: list[str] = []
    try:
        for lines in config.hook.pytest_report_header(config=config, start_path=config.rootpath):
            header += [lines] if isinstance(lines, str) else list(lines)
    except Exception as error:  # a header hook that fails must not lose the run's lines
        header.append(f"report header failed: {type(error).__name__}: {error}")
    write(config, {"event": "session", "collected": len(session.items), "header": header})


def first_line(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = str(report.longrepr or "")
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return (errors[0] if errors else lines[-1] if lines else "")[:500]


def benchmark_stats(item: pytest.Item) -> dict[str, Any] | None:
    """pytest-benchmark's figures of ``item``, when it ran a benchmark (its fixture is still alive at the
    end of the call phase)."""
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    metadata = getattr(fixture, "stats", None)
    stats = getattr(metadata, "stats", None)
    if not stats:
        return None
    figures = {"rounds": len(stats.data), "iterations": getattr(metadata, "iterations", None)}
    for name in ("min", "median", "mean", "max"):
        figures[name] = getattr(stats, name)
    extra = {
        key: value
        for key, value in getattr(fixture, "extra_info", {}).items()
        if isinstance(value, (int, float, str, bool)) or value is None
    }
    return {"fullname": item.nodeid, "stats": figures, "extra_info": extra}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    config = item.config
    if OUTCOMES not in config.stash:
        return
    report: pytest.TestReport = outcome.get_result()
    state = config.stash[OUTCOMES].setdefault(item.nodeid, {"outcome": "passed", "duration": 0.0, "message": ""})
    state["duration"] += report.duration
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if xfail:
            state["outcome"] = "xfailed" if report.skipped else "xpassed"
        elif report.outcome != "passed":
            state["outcome"] = report.outcome
        bench = benchmark_stats(item)
        if bench is not None:
            state["benchmark"] = bench
    elif report.failed:
        state["outcome"] = "error"
    elif report.skipped and report.when == "setup":
        state["outcome"] = "xfailed" if xfail else "skipped"
    if (report.failed or report.skipped) and not state["message"]:
        state["message"] = first_line(report)
    if report.when == "teardown":
        write(config, {"event": "test", "nodeid": item.nodeid, **config.stash[OUTCOMES].pop(item.nodeid)})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    write(session.config, {"event": "finish", "exitstatus": int(exitstatus)})


def pytest_unconfigure(config: pytest.Config) -> None:
    file = config.stash.get(LINES, None)
    if file is not None:
        file.close()
        del config.stash[LINES]
