"""``perpeft-engine experiment``: run (or resume) a grid, then write its ``results.csv`` and ``table.md``."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError, RunError
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
from perpeft.engine.runtime.run_lock import holding_run_lock

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
    ``results.csv`` (every run) and ``table.md`` (each cell at its selected combination) under ``out``.

    Runs that failed are listed in both with their reasons, the tables are over the runs that finished, and
    then RunError says how many failed: rerunning the same grid retries them.
    """
    if not seeds:
        raise InputError("--seeds: give at least one seed")
    base, tuning = split_tuning(base, tuning or {})
    variants = tuning_variants(tuning)
    with holding_run_lock(out):  # one grid writes here; each cell's run also holds its own lock
        finished, failed = run_grid(base, cells, seeds, out, report, variants)
        selected, selections = select_by_validation(finished)
        reseeded, failed_reseeds = reseeded_runs(selected, report)
        failed += failed_reseeds
        atomic_write_bytes(out / RESULTS_CSV, results_csv(finished, out, selected, failed).encode())
        tuned = Tuned(tuning, selections) if tuning else None
        table = tables_markdown(selected, base, seeds, reseeded, tuned, failed, out)
        atomic_write_bytes(out / TABLE_MD, table.encode())
    if failed:
        failed_runs = {entry.run for entry in failed}
        raise RunError(
            f"{out}: {len(failed_runs)} of {len(failed_runs | {entry.run for entry in finished})} "
            f"runs failed (listed with their reasons in "
            f"{TABLE_MD} and {RESULTS_CSV}); run the same command again to retry them"
        )
    return finished
