"""Grids of runs that reproduce the paper's tables, resumable cell by cell, summarised as CSV and Markdown.

Sections (each a list of cells; a cell is one configuration, trained once per seed):

- ``methods`` — Table 2: every method × PEFT type (w/o MM and Frozen MM once: they use no PEFT);
- ``ablations`` — Table 3: PerPEFT without text / image / group negatives, Large Global PEFT, random grouping;
- ``clustering`` — Table 6: K-Means vs GMM grouping, with a paired t-test over seeds;
- ``groups`` — Figure 7(b): PerPEFT with C = 4, 8, 16;
- ``scalability`` — Figure 4 / Tables 8–9: per-epoch training time, peak memory and parameter counts of
  Global PEFT and PerPEFT per PEFT type, read from the PerPEFT cells' two stages;
- ``divergence`` — Table 7: inter- and intra-group JSD of CLIP's EOS→title attention. Each seed ``s``'s
  PerPEFT run also gets a *reseeded* run beside it (``seed-s-reseed-(s+1)``): the same Global stage and
  groups, the second stage retrained with seed ``s + 1`` (App. C.5.1, "the same cluster, another seed").

With a tuning grid (several values of ``lr``, ``weight_decay``, ``id_lr``, ``epochs_global`` or
``epochs_perpeft``), every cell trains once per combination of those values and seed, and
`select_by_validation` keeps, per cell, the combination with the best mean validation HR@30 over seeds
(the paper's protocol, App. C.2): the tables report test metrics at that combination and say which values
won.

Cells that are the same configuration in several sections (PerPEFT with LoRA and C = 8 is in four) train
once. Every cell's run lives in ``OUT/runs/NAME/seed-N``; a finished run (``metrics.json``) is skipped, an
interrupted one resumed, so rerunning the command continues an interrupted grid. Two-stage methods
train without the E1+E2 Global PEFT baseline (``--no-baseline``): Global PEFT is a cell of its own.
"""

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perpeft.engine.config.choices import ADAPTER_PEFTS
from perpeft.engine.config.methods import METHODS, method_of
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.errors import InputError, RunError, first_line
from perpeft.engine.eval.metrics import SELECTION_METRIC
from perpeft.engine.eval.report import result_metrics
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.train.pipeline import resume_run, silent, train_new_run, trained_config
from perpeft.engine.train.reseed import reseeded_config

# What a tuning grid may vary, and each one's tag in run-directory names.
TUNED_NAMES = {"lr": "lr", "weight_decay": "wd", "id_lr": "idlr", "epochs_global": "e1", "epochs_perpeft": "e2"}
TUNED_SETTINGS = tuple(TUNED_NAMES)
Variant = tuple[tuple[str, Any], ...]  # one combination of tuned values, in TUNED_SETTINGS order
RESEED_OFFSET = 1  # Table 7's reseeded run of seed s trains its second stage with seed s + RESEED_OFFSET
ABLATIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("w/o textual modality", "perpeft", {"text": False}),
    ("w/o visual modality", "perpeft", {"image": False}),
    ("w/o group-specific negatives", "perpeft", {"group_negatives": False}),
    ("Large Global PEFT", "large-global-peft", {}),
    ("Random grouping", "perpeft", {"grouping": "random"}),
    ("PerPEFT", "perpeft", {}),
)


@dataclass(frozen=True)
class Cell:
    """One configuration of one section: ``row`` and ``peft`` place it in that section's table."""

    section: str
    row: str
    peft: str | None
    changes: tuple[tuple[str, Any], ...]

    def config(self, base: RunConfig, seed: int) -> RunConfig:
        """``base`` with this cell's changes and ``seed``."""
        return dataclasses.replace(base, seed=seed, **dict(self.changes))


def run_name(config: RunConfig) -> str:
    """A readable directory name of what a cell changes: method, PEFT, C and every ablation switch."""
    method = method_of(config)
    parts = [config.method, config.peft if method.uses_peft else "none", f"C{config.groups}"]
    parts += [f"no-{name}" for name in ("text", "image") if getattr(config, name) is False]
    if not config.group_negatives:
        parts.append("no-group-negatives")
    if config.grouping != "interest":
        parts.append(f"{config.grouping}-grouping")
    if config.clustering != "kmeans":
        parts.append(config.clustering)
    return "-".join(parts)


def _cell(section: str, row: str, peft: str | None, method: str, **changes: Any) -> Cell:
    settings = {"method": method, **({"peft": peft} if peft else {}), **changes}
    return Cell(section, row, peft, tuple(sorted(settings.items())))


def build_grid(
    pefts: list[str],
    methods: list[str],
    ablations: bool,
    clusterings: list[str],
    group_counts: list[int],
    scalability: bool,
    divergence: bool = False,
) -> list[Cell]:
    """Cells of the requested sections. Ablations, clustering, groups and divergence use the first PEFT type."""
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise InputError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)}, or all)")
    cells = []
    for method in methods:
        if METHODS[method].uses_peft:
            cells += [_cell("methods", method, peft, method) for peft in pefts]
        else:
            cells.append(_cell("methods", method, None, method))
    first = pefts[0]
    if ablations:
        cells += [_cell("ablations", title, first, method, **changes) for title, method, changes in ABLATIONS]
    cells += [_cell("clustering", name, first, "perpeft", clustering=name) for name in clusterings]
    cells += [_cell("groups", f"C={count}", first, "perpeft", groups=count) for count in group_counts]
    if scalability:
        cells += [_cell("scalability", "PerPEFT", peft, "perpeft") for peft in pefts]
    if divergence:
        if first not in ADAPTER_PEFTS:
            raise InputError("--divergence reads attention under CLIP adapters: the first --peft must be lora or ia3")
        cells.append(_cell("divergence", "PerPEFT", first, "perpeft"))
    if not cells:
        raise InputError(
            "nothing to run: pass --methods, --ablations, --clustering, --group-counts, --scalability or --divergence"
        )
    return cells


def tuning_variants(tuning: dict[str, list[Any]]) -> list[Variant]:
    """Every combination of the tuned values (``{setting: values}``, settings of `TUNED_SETTINGS`); one empty
    variant when nothing is tuned."""
    unknown = sorted(set(tuning) - set(TUNED_SETTINGS))
    if unknown:
        raise ValueError(f"only {TUNED_SETTINGS} can be tuned, not {unknown}")
    names = [name for name in TUNED_SETTINGS if name in tuning]
    for name in names:
        if not tuning[name]:
            raise InputError(f"--{name.replace('_', '-')}: give at least one value")
    return [tuple(zip(names, values, strict=True)) for values in itertools.product(*(tuning[name] for name in names))]


def split_tuning(base: RunConfig, tuning: dict[str, list[Any]]) -> tuple[RunConfig, dict[str, list[Any]]]:
    """``base`` with every setting given one value, and the settings given several (the tuning grid)."""
    single = {name: values[0] for name, values in tuning.items() if len(values) == 1}
    return dataclasses.replace(base, **single), {name: values for name, values in tuning.items() if len(values) > 1}


def variant_name(variant: Variant) -> str:
    """The run-directory suffix of a tuned combination, e.g. ``-lr0.001-wd0.0001`` ("" when not tuned)."""
    return "".join(f"-{TUNED_NAMES[name]}{value:g}" for name, value in variant)


@dataclass
class Finished:
    """A cell's run for one seed and tuned combination, once its metrics exist."""

    cell: Cell
    seed: int
    run: Path
    metrics: dict[str, Any]
    variant: Variant = ()


@dataclass(frozen=True)
class Failed:
    """A cell's run for one seed and tuned combination that stopped with an error (``reason``, one line); its
    directory keeps what it wrote, so rerunning the grid retries it from there."""

    cell: Cell
    seed: int
    run: Path
    reason: str
    variant: Variant = ()


@dataclass(frozen=True)
class Selection:
    """The tuned combination a cell reports: the best mean validation `SELECTION_METRIC` over seeds."""

    cell: Cell
    variant: Variant
    valid: float
    candidates: int


@dataclass(frozen=True)
class Tuned:
    """A tuning grid (``{setting: values tried}``) and the combination each cell reports."""

    grid: dict[str, list[Any]]
    selections: list[Selection]


def select_by_validation(finished: list[Finished]) -> tuple[list[Finished], list[Selection]]:
    """Per cell, the runs of the combination with the best mean validation `SELECTION_METRIC` over seeds
    (the first in grid order on a tie), in grid order, and what was selected."""
    scores: dict[Cell, dict[Variant, list[float]]] = {}
    for entry in finished:
        valid = result_metrics(entry.metrics)["valid"][SELECTION_METRIC]
        scores.setdefault(entry.cell, {}).setdefault(entry.variant, []).append(valid)
    selections = []
    for cell, by_variant in scores.items():
        means = {variant: statistics.mean(values) for variant, values in by_variant.items()}
        best = max(means, key=means.__getitem__)
        selections.append(Selection(cell, best, means[best], len(means)))
    chosen = {(selection.cell, selection.variant) for selection in selections}
    return [entry for entry in finished if (entry.cell, entry.variant) in chosen], selections


def _check_cell(config: RunConfig, path: Path) -> None:
    """InputError when ``path`` holds a run of another configuration (the grid's --out is another grid's)."""
    if (
        RunDirectory.holds_run(path)
        and RunDirectory.open(path).config != trained_config(config, run_dataset(config))[0]
    ):
        raise InputError(f"{path}: holds a run of another configuration; use another --out")


def _train_cell(config: RunConfig, path: Path, global_from: RunDirectory | None = None) -> dict[str, Any]:
    """Train, resume or skip the run at ``path`` (a new one from ``global_from``'s Global stage when given);
    the caller has checked that ``path`` holds no other configuration (`_check_cell`)."""
    if RunDirectory.holds_run(path):
        run = RunDirectory.open(path)
        if run.finished:
            return run.read_metrics()
        return resume_run(path, silent, progress=False)[1]
    # Cells train without per-epoch lines: the grid reports one line per cell.
    return train_new_run(config, path, overwrite=False, report=silent, progress=False, global_from=global_from)[1]


def run_grid(
    base: RunConfig,
    cells: list[Cell],
    seeds: list[int],
    out: Path,
    report: Callable[[str], None] = print,
    variants: list[Variant] | None = None,
) -> tuple[list[Finished], list[Failed]]:
    """Every (cell, tuned combination, seed) run, each distinct configuration trained once, with a progress
    line and ETA each. A run that fails (training diverged, a write failed, any error) is reported and
    returned among the failures; the grid goes on with the others."""
    variants = variants or [()]
    jobs: dict[tuple[str, int], RunConfig] = {}
    entries: list[tuple[Cell, int, Variant, str]] = []  # every (cell, seed, variant) and its run's name
    for seed in seeds:
        for cell in cells:
            for variant in variants:
                config = dataclasses.replace(cell.config(base, seed), **dict(variant))
                name = run_name(config) + variant_name(variant)
                jobs.setdefault((name, seed), config)
                entries.append((cell, seed, variant, name))
    for (name, seed), config in jobs.items():  # refused before any cell trains, not cell by cell
        _check_cell(config, out / "runs" / name / f"seed-{seed}")
    metrics: dict[tuple[str, int], dict[str, Any]] = {}
    reasons: dict[tuple[str, int], str] = {}
    trained_seconds: list[float] = []
    for index, ((name, seed), config) in enumerate(jobs.items(), start=1):
        path = out / "runs" / name / f"seed-{seed}"
        finished_before = RunDirectory.holds_run(path) and RunDirectory(path).finished
        started = time.perf_counter()
        try:
            metrics[name, seed] = _train_cell(config, path)
        except Exception as error:  # one run's failure, whatever it is, must not end the grid
            reasons[name, seed] = failure_reason(error).removeprefix(f"{path}: ")  # the row names the run
            report(f"[{index}/{len(jobs)}] {name} seed {seed}: FAILED: {reasons[name, seed]}")
            continue
        seconds = time.perf_counter() - started
        if finished_before:
            status = "done earlier"
        else:
            trained_seconds.append(seconds)
            status = f"{seconds:.0f} s"
        remaining = len(jobs) - index
        eta = f"ETA {_duration(statistics.mean(trained_seconds) * remaining)}" if trained_seconds and remaining else ""
        result = result_metrics(metrics[name, seed])["test"]["NDCG@20"]
        report(f"[{index}/{len(jobs)}] {name} seed {seed}: test NDCG@20 {result:.4f} ({status})  {eta}".rstrip())
    finished = [
        Finished(cell, seed, out / "runs" / name / f"seed-{seed}", metrics[name, seed], variant)
        for cell, seed, variant, name in entries
        if (name, seed) in metrics
    ]
    failed = [
        Failed(cell, seed, out / "runs" / name / f"seed-{seed}", reasons[name, seed], variant)
        for cell, seed, variant, name in entries
        if (name, seed) in reasons
    ]
    return finished, failed


def failure_reason(error: Exception) -> str:
    """One line for a failed run: the engine's own errors say it all; others are named by their type."""
    if isinstance(error, InputError | RunError):
        return first_line(error)
    message = first_line(error)
    return message if message == type(error).__name__ else f"{type(error).__name__}: {message}"


def reseeded_runs(
    finished: list[Finished], report: Callable[[str], None] = print
) -> tuple[dict[int, Path], list[Failed]]:
    """Table 7's intra-group runs, trained (or resumed, or skipped when finished) beside each seed ``s``'s
    PerPEFT run of the divergence section: its Global stage and groups, second stage with seed ``s + 1``;
    those that failed apart."""
    paths, failed = {}, []
    for entry in finished:
        if entry.cell.section != "divergence":
            continue
        source = RunDirectory.open(entry.run)
        seed = entry.seed + RESEED_OFFSET
        path = RunDirectory(entry.run).reseed_path(seed)
        config = reseeded_config(source, seed)
        _check_cell(config, path)
        started = time.perf_counter()
        try:
            metrics = _train_cell(config, path, global_from=source)
        except Exception as error:  # one run's failure, whatever it is, must not end the grid
            reason = failure_reason(error).removeprefix(f"{path}: ")
            failed.append(Failed(entry.cell, entry.seed, path, reason, entry.variant))
            report(f"reseeded {entry.run.parent.name} seed {entry.seed} → {seed}: FAILED: {failed[-1].reason}")
            continue
        result = result_metrics(metrics)["test"]["NDCG@20"]
        report(
            f"reseeded {entry.run.parent.name} seed {entry.seed} → {seed}: test NDCG@20 {result:.4f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
        paths[entry.seed] = path
    return paths, failed


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
