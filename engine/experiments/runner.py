"""``perpeft-engine experiment``: run (or resume) a grid, then write its ``results.csv`` and ``table.md``."""

from collections.abc import Callable
from pathlib import Path

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.experiments.grid import Cell, Finished, reseeded_runs, run_grid
from perpeft.engine.experiments.tables import results_csv, tables_markdown
from perpeft.engine.runtime.atomic import atomic_write_bytes

RESULTS_CSV = "results.csv"


TABLE_MD = "table.md"


def run_experiment(
    base: RunConfig, cells: list[Cell], seeds: list[int], out: Path, report: Callable[[str], None] = print
) -> list[Finished]:
    """Run (or resume) the grid and write ``results.csv`` and ``table.md`` under ``out``."""
    if not seeds:
        raise InputError("--seeds: give at least one seed")
    out.mkdir(parents=True, exist_ok=True)
    finished = run_grid(base, cells, seeds, out, report)
    reseeded = reseeded_runs(finished, report)
    atomic_write_bytes(out / RESULTS_CSV, results_csv(finished, out).encode())
    atomic_write_bytes(out / TABLE_MD, tables_markdown(finished, base, seeds, reseeded).encode())
    return finished
