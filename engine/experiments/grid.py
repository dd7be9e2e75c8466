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

Cells that are the same configuration in several sections (PerPEFT with LoRA and C = 8 is in four) train
once. Every cell's run lives in ``OUT/runs/NAME/seed-N``; a finished run (``metrics.json``) is skipped, an
interrupted one resumed, so rerunning the command continues an interrupted grid. Two-stage methods
train without the E1+E2 Global PEFT baseline (``--no-baseline``): Global PEFT is a cell of its own.
"""

import csv
import dataclasses
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from perpeft.engine.analysis.attention import divergences as attention_divergences
from perpeft.engine.config.choices import ADAPTER_PEFTS
from perpeft.engine.config.methods import METHODS, TABLE2_METHODS, method_of
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sources import load_dataset
from perpeft.engine.errors import InputError
from perpeft.engine.model.params import large_adapter_config, parameter_counts
from perpeft.engine.runtime.atomic import atomic_write_bytes
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.train.pipeline import resume_run, silent, train_new_run
from perpeft.engine.train.reseed import reseeded_config

RESULTS_CSV = "results.csv"
TABLE_MD = "table.md"
METRICS = ("HR@10", "HR@20", "HR@30", "NDCG@10", "NDCG@20", "NDCG@30")
TABLE_METRICS = ("HR@20", "HR@30", "NDCG@20", "NDCG@30")  # the paper's columns, ×100
SHORT = {"HR@20": "H@20", "HR@30": "H@30", "NDCG@20": "N@20", "NDCG@30": "N@30"}
RESEED_OFFSET = 1  # Table 7's reseeded run of seed s trains its second stage with seed s + RESEED_OFFSET
PEFT_TITLES = {"lora": "LoRA", "ia3": "(IA)3", "iisan": "IISAN"}
ABLATIONS = (
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
    parts += [f"no-{name}" for name in ("text", "image") if not getattr(config, name)]
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
            "nothing to run: pass --methods, --ablations, --clustering, --groups, --scalability or --divergence"
        )
    return cells


@dataclass
class Finished:
    """A cell's run for one seed, once its metrics exist."""

    cell: Cell
    seed: int
    run: Path
    metrics: dict[str, Any]


def _train_cell(config: RunConfig, path: Path, global_from: RunDirectory | None = None) -> dict[str, Any]:
    """Train, resume or skip the run at ``path`` (a new one from ``global_from``'s Global stage when given);
    a directory holding another configuration is refused."""
    if RunDirectory.holds_run(path):
        run = RunDirectory.open(path)
        expected = config.resolved()
        if method_of(expected).large:
            expected = large_adapter_config(expected)[0]
        if run.config != expected:
            raise InputError(f"{path}: holds a run of another configuration; use another --out")
        if run.finished:
            return run.read_metrics()
        return resume_run(path, silent, progress=False)[1]
    # Cells train without per-epoch lines: the grid reports one line per cell.
    return train_new_run(config, path, overwrite=False, report=silent, progress=False, global_from=global_from)[1]


def run_grid(
    base: RunConfig, cells: list[Cell], seeds: list[int], out: Path, report: Callable[[str], None] = print
) -> list[Finished]:
    """Every (cell, seed) run, each distinct configuration trained once, with a progress line and ETA each."""
    jobs: dict[tuple[str, int], RunConfig] = {}
    for seed in seeds:
        for cell in cells:
            config = cell.config(base, seed)
            jobs.setdefault((run_name(config), seed), config)
    metrics: dict[tuple[str, int], dict[str, Any]] = {}
    trained_seconds: list[float] = []
    for index, ((name, seed), config) in enumerate(jobs.items(), start=1):
        path = out / "runs" / name / f"seed-{seed}"
        finished_before = RunDirectory.holds_run(path) and RunDirectory(path).finished
        started = time.perf_counter()
        metrics[name, seed] = _train_cell(config, path)
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
    finished = []
    for seed in seeds:
        for cell in cells:
            name = run_name(cell.config(base, seed))
            finished.append(Finished(cell, seed, out / "runs" / name / f"seed-{seed}", metrics[name, seed]))
    return finished


def reseeded_runs(finished: list[Finished], report: Callable[[str], None] = print) -> dict[int, Path]:
    """Table 7's intra-group runs, trained (or resumed, or skipped when finished) beside each seed ``s``'s
    PerPEFT run of the divergence section: its Global stage and groups, second stage with seed ``s + 1``."""
    paths = {}
    for entry in finished:
        if entry.cell.section != "divergence":
            continue
        source = RunDirectory.open(entry.run)
        seed = entry.seed + RESEED_OFFSET
        path = RunDirectory(entry.run).reseed_path(seed)
        started = time.perf_counter()
        metrics = _train_cell(reseeded_config(source, seed), path, global_from=source)
        result = result_metrics(metrics)["test"]["NDCG@20"]
        report(
            f"reseeded {entry.run.parent.name} seed {entry.seed} → {seed}: test NDCG@20 {result:.4f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
        paths[entry.seed] = path
    return paths


def divergence_table(finished: list[Finished], reseeded: dict[int, Path]) -> list[str]:
    """Table 7 per seed and as a mean: inter-group JSD, intra-group JSD against the reseeded run (the paper's
    protocol) and, with several seeds, against the next seed's independent run (groups matched by users)."""
    entries = [entry for entry in finished if entry.cell.section == "divergence"]
    independent = len(entries) > 1
    values, others = [], []
    for index, entry in enumerate(entries):
        compared = [reseeded[entry.seed]]
        if independent:
            other = entries[(index + 1) % len(entries)]
            compared.append(other.run)
            others.append(str(other.seed))
        result = attention_divergences(entry.run, compared, progress=False)
        same, *across = result["against"]
        row, items = [result["inter"], same["intra"]], result["items"]
        if across:
            row += [across[0]["intra"], across[0]["matched_users"]]
        values.append(row)

    def line(label: str, row: list[float], other: str) -> str:
        cells = [label, f"{row[0]:.5f}", f"{row[1]:.5f}"]
        if independent:
            cells += [other, f"{row[2]:.5f}", f"{100 * row[3]:.1f}%"]
        return "| " + " | ".join(cells) + " |"

    header = "| Seed | Inter-clus. | Intra-clus. (same groups, seed + 1) |"
    rule = "|---|---:|---:|"
    if independent:
        header += " Independent run: seed | its intra JSD | users in matched group |"
        rule += "---|---:|---:|"
    means = [statistics.mean(column) for column in zip(*values, strict=True)]
    return [
        f"### Table 7: attention divergence ({PEFT_TITLES[entries[0].cell.peft]}, JSD in nats of the last-layer "
        f"EOS→title attention, mean over {items:,} items)",
        "",
        header,
        rule,
        *(
            line(str(entry.seed), row, other)
            for entry, row, other in zip(entries, values, others or [""] * len(entries), strict=True)
        ),
        line("mean", means, ""),
        "",
        "Intra-clus. as in App. C.5.1: the run's own groups with the second stage retrained with another seed "
        "(`train --global-from`). The independent-run columns compare with another seed trained end to end, "
        "whose Global stage and grouping differ (groups matched one-to-one by shared users).",
    ]


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def result_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The stage summary that is the method's result (PerPEFT's second stage, else Global)."""
    return metrics[metrics["result"]]


def results_csv(finished: list[Finished], out: Path) -> str:
    """One row per cell and seed with every validation and test metric of the selected epoch; ``run`` is
    the run's directory relative to ``out``."""
    header = ["section", "row", "peft", "method", "seed", "run", "best_epoch"]
    header += [f"{stage}_{metric}" for stage in ("valid", "test") for metric in METRICS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for entry in finished:
        result = result_metrics(entry.metrics)
        writer.writerow(
            [
                entry.cell.section,
                entry.cell.row,
                entry.cell.peft or "",
                entry.metrics["method"],
                entry.seed,
                entry.run.relative_to(out).as_posix(),
                result["best_epoch"],
                *(f"{result[stage][metric]:.6f}" for stage in ("valid", "test") for metric in METRICS),
            ]
        )
    return buffer.getvalue()


def _values(finished: list[Finished], section: str, row: str, peft: str | None, metric: str) -> list[float]:
    """Test ``metric`` ×100 of a cell over seeds, in seed order."""
    return [
        100 * result_metrics(entry.metrics)["test"][metric]
        for entry in finished
        if entry.cell.section == section and entry.cell.row == row and entry.cell.peft == peft
    ]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _format(values: list[float], best: bool) -> str:
    mean, std = _mean_std(values)
    text = f"{mean:.2f} ({std:.2f})"
    return f"**{text}**" if best else text


def _metric_table(rows: list[tuple[list[str], dict[str, list[float]]]], mark: bool) -> list[str]:
    """Markdown rows ``labels… | metric cells…``; with ``mark`` the best mean per metric is bold."""
    best = {
        metric: max(range(len(rows)), key=lambda index: statistics.mean(rows[index][1][metric]))
        for metric in TABLE_METRICS
    }
    lines = []
    for index, (labels, values) in enumerate(rows):
        cells = [_format(values[metric], mark and best[metric] == index) for metric in TABLE_METRICS]
        lines.append("| " + " | ".join(labels + cells) + " |")
    return lines


def methods_table(finished: list[Finished], dataset: str) -> list[str]:
    """Table 2's layout: a block per PEFT type (w/o MM and Frozen MM under N/A), best per PEFT block in bold."""
    keys = list(
        dict.fromkeys((entry.cell.peft, entry.cell.row) for entry in finished if entry.cell.section == "methods")
    )
    peft_order = [None, *PEFT_TITLES]  # N/A first, then the paper's order: LoRA, (IA)3, IISAN
    keys.sort(key=lambda key: (peft_order.index(key[0]), TABLE2_METHODS.index(key[1])))
    lines = [
        f"### Table 2: methods × PEFT types ({dataset}, test, ×100)",
        "",
        "| PEFT | Method | " + " | ".join(SHORT[metric] for metric in TABLE_METRICS) + " |",
        "|---|---|" + "---:|" * len(TABLE_METRICS),
    ]
    for peft in dict.fromkeys(peft for peft, _ in keys):
        rows = [
            (
                "" if position else PEFT_TITLES.get(peft, "N/A"),
                METHODS[row].title,
                {metric: _values(finished, "methods", row, peft, metric) for metric in TABLE_METRICS},
            )
            for position, row in enumerate(row for block, row in keys if block == peft)
        ]
        lines += _metric_table([([first, title], values) for first, title, values in rows], peft is not None)
    return lines


def _simple_table(finished: list[Finished], section: str, title: str, mark: bool) -> list[str]:
    rows_order = list(dict.fromkeys(entry.cell.row for entry in finished if entry.cell.section == section))
    peft = next(entry.cell.peft for entry in finished if entry.cell.section == section)
    rows = [
        ([row], {metric: _values(finished, section, row, peft, metric) for metric in TABLE_METRICS})
        for row in rows_order
    ]
    header = [
        "| Variant | " + " | ".join(SHORT[m] for m in TABLE_METRICS) + " |",
        "|---|" + "---:|" * len(TABLE_METRICS),
    ]
    return [title.format(peft=PEFT_TITLES.get(peft, peft)), "", *header, *_metric_table(rows, mark)]


def paired_p_values(finished: list[Finished], section: str, rows: tuple[str, str]) -> dict[str, float]:
    """Paired t-test p-value per metric between two rows of a section, pairing runs by seed."""
    peft = next(entry.cell.peft for entry in finished if entry.cell.section == section)
    result = {}
    for metric in TABLE_METRICS:
        first, second = (_values(finished, section, row, peft, metric) for row in rows)
        if len(first) < 2 or first == second:
            result[metric] = math.nan
        else:
            result[metric] = float(stats.ttest_rel(first, second).pvalue)
    return result


def clustering_table(finished: list[Finished]) -> list[str]:
    """Table 6: one row per clustering algorithm and, for two of them, the paired t-test p-values."""
    lines = _simple_table(finished, "clustering", "### Table 6: clustering algorithms ({peft}, test, ×100)", False)
    rows = list(dict.fromkeys(entry.cell.row for entry in finished if entry.cell.section == "clustering"))
    if len(rows) == 2:
        p_values = paired_p_values(finished, "clustering", (rows[0], rows[1]))
        lines.append("| P-value | " + " | ".join(f"{p_values[m]:.3f}" for m in TABLE_METRICS) + " |")
    return lines


def scalability_table(finished: list[Finished]) -> list[str]:
    """Figure 4 / Tables 8–9: per PEFT type, mean per-epoch training time and peak memory of each stage
    (first seed's PerPEFT run: its ``global`` stage is Global PEFT) and both parameter totals."""
    lines = [
        "### Scalability: per-epoch training time, peak memory and parameters (first seed)",
        "",
        "| PEFT | Global PEFT s/epoch | PerPEFT s/epoch | ratio | Global PEFT peak MiB | PerPEFT peak MiB "
        "| Global PEFT params | PerPEFT params | frozen CLIP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for entry in finished:
        if entry.cell.section != "scalability" or entry.cell.peft in seen:
            continue
        seen.add(entry.cell.peft)
        run = RunDirectory.open(entry.run)
        state, config = run.read_state(), run.config
        per_stage = {}
        for stage in ("global", "perpeft"):
            history = state[stage]["history"]
            per_stage[stage] = (
                statistics.mean(record["train_seconds"] for record in history),
                max(record["train_peak_bytes"] for record in history) / 2**20,
            )
        num_items = load_dataset(config.data, config.data_dir).num_items
        counts = parameter_counts(config.clip, config.peft, config.groups, num_items)
        (global_s, global_mib), (perpeft_s, perpeft_mib) = per_stage["global"], per_stage["perpeft"]
        lines.append(
            f"| {PEFT_TITLES[config.peft]} | {global_s:.2f} | {perpeft_s:.2f} | {perpeft_s / global_s:.2f}× "
            f"| {global_mib:,.0f} | {perpeft_mib:,.0f} | {counts['global_peft_total']:,} "
            f"| {counts['perpeft_total']:,} | {counts['clip_frozen']:,} |"
        )
    return lines


def tables_markdown(
    finished: list[Finished], base: RunConfig, seeds: list[int], reseeded: dict[int, Path] | None = None
) -> str:
    """``table.md``: every requested section's table, laid out like the paper's, under the grid's settings."""
    sections = {entry.cell.section for entry in finished}
    dataset = Path(base.data).name
    settings = base.resolved()
    lines = [
        f"# Experiment on `{dataset}`, seeds {', '.join(map(str, seeds))}",
        "",
        f"Settings: E1 = {settings.epochs_global}, E2 = {settings.epochs_perpeft} (single-stage methods train "
        f"E1 + E2 epochs), lr {settings.lr:g}, weight decay {settings.weight_decay:g}, batch {settings.batch_size}, "
        f"C = {settings.groups} unless a row says otherwise. Test metrics at the best epoch by validation HR@30, "
        "×100, mean (standard deviation) over seeds. Bold: best mean per column (per PEFT block in Table 2).",
        "",
    ]
    if "methods" in sections:
        lines += [*methods_table(finished, dataset), ""]
    if "ablations" in sections:
        lines += [*_simple_table(finished, "ablations", "### Table 3: ablations ({peft}, test, ×100)", True), ""]
    if "clustering" in sections:
        lines += [*clustering_table(finished), ""]
    if "groups" in sections:
        title = "### Figure 7(b): number of groups ({peft}, test, ×100)"
        lines += [*_simple_table(finished, "groups", title, True), ""]
    if "scalability" in sections:
        lines += [*scalability_table(finished), ""]
    if "divergence" in sections:
        lines += [*divergence_table(finished, reseeded or {}), ""]
    return "\n".join(lines)


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
