"""Analyses of finished PerPEFT runs: EOS→title attention per group and its Jensen–Shannon divergence
(paper §4.5, App. C.5.1, `attention`), and the recommendation case study (paper §4.4, `case`).

Every analysis reads a run's selected best-epoch weights, so it opens the run with `open_perpeft_run`.
"""

from pathlib import Path

from perpeft.engine.config.methods import method_of
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.run_directory import RunDirectory


def open_perpeft_run(path: Path) -> RunDirectory:
    """A finished run of the PerPEFT method (per-group adapters); InputError naming the run otherwise."""
    run = RunDirectory.open(path)
    config = run.config
    if not method_of(config).grouped_adapters:
        raise InputError(
            f"{run.path}: a --method {config.method} run has no per-group adapters; the analyses need a PerPEFT run"
        )
    run.best_checkpoint("perpeft")
    return run


def refuse_existing(path: Path, overwrite: bool) -> None:
    """InputError when ``path`` exists and ``overwrite`` is not set: an analysis never replaces a file silently."""
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass --overwrite to replace it")
