"""``perpeft-engine experiment``: run (or resume) a grid, then write its ``results.csv`` and ``table.md``."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.experiments.grid import (
    Cell,
    Finished,
    Tuned,
    reseeded_runs,
    run_grid,
    select_by_validation,
    split_tuning,
    tuning_variants,
)
from perpeft.engine.experiments.tables import results_csv, tables_markdown
from perpeft.engine.runtime.atomic import atomic_write_bytes

RESULTS_CSV = "results.csv"


TABLE_MD = "table.md"


def run_experiment(
    base: RunConfig,
    cells: list[Cell],
    seeds: list[int],
    out: Path,
    report: Callable[[str], None] = print,
    tuning: dict[str, list[Any]] | None = None,
) -> list[Finished]:
    """Run (or resume) the grid, every cell at every combination of the ``tuning`` values, and write
    ``results.csv`` (every run) and ``table.md`` (each cell at its selected combination) under ``out``."""
    if not seeds:
        raise InputError("--seeds: give at least one seed")
    base, tuning = split_tuning(base, tuning or {})
    variants = tuning_variants(tuning)
    out.mkdir(parents=True, exist_ok=True)
    finished = run_grid(base, cells, seeds, out, report, variants)
    selected, selections = select_by_validation(finished)
    reseeded = reseeded_runs(selected, report)
    atomic_write_bytes(out / RESULTS_CSV, results_csv(finished, out, selected).encode())
    tuned = Tuned(tuning, selections) if tuning else None
    atomic_write_bytes(out / TABLE_MD, tables_markdown(selected, base, seeds, reseeded, tuned).encode())
    return finished
