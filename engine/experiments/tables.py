"""The paper's tables from a finished grid: ``results.csv`` (one row per cell and seed) and ``table.md``
(Tables 2, 3, 6, 7, Figure 7(b) and the scalability table, laid out like the paper's)."""

import csv
import io
import math
import statistics
from pathlib import Path

from scipy import stats

from perpeft.engine.analysis.attention import divergences as attention_divergences
from perpeft.engine.config.methods import METHODS, TABLE2_METHODS
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.eval.metrics import METRIC_NAMES, SELECTION_METRIC
from perpeft.engine.eval.report import result_metrics
from perpeft.engine.experiments.grid import TUNED_SETTINGS, Failed, Finished, Tuned
from perpeft.engine.model.params import parameter_counts
from perpeft.engine.runtime.run_directory import RunDirectory

TABLE_METRICS = ("HR@20", "HR@30", "NDCG@20", "NDCG@30")  # the paper's columns, ×100


SHORT = {"HR@20": "H@20", "HR@30": "H@30", "NDCG@20": "N@20", "NDCG@30": "N@30"}


PEFT_TITLES = {"lora": "LoRA", "ia3": "(IA)3", "iisan": "IISAN"}


def divergence_table(finished: list[Finished], reseeded: dict[int, Path]) -> list[str]:
    """Table 7 per seed and as a mean: inter-group JSD, intra-group JSD against the reseeded run (the paper's
    protocol) and, with several seeds, against the next seed's independent run (groups matched by users)."""
    entries = [entry for entry in finished if entry.cell.section == "divergence" and entry.seed in reseeded]
    if not entries:
        return []
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
    peft = entries[0].cell.peft
    if peft is None:
        raise ValueError("the divergence cell names no PEFT type (the analysis needs a PerPEFT run)")
    return [
        f"### Table 7: attention divergence ({PEFT_TITLES[peft]}, JSD in nats of the last-layer "
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


def results_csv(finished: list[Finished], out: Path, selected: list[Finished], failed: list[Failed]) -> str:
    """One row per cell, tuned combination and seed with its training settings and every validation and
    test metric of the selected epoch; ``run`` is the run's directory relative to ``out``, ``selected``
    whether the tables report that run (its combination won the cell's validation). A failed run's row has
    no metrics and its reason under ``error``."""
    header = ["section", "row", "peft", "method", "seed", "run", *TUNED_SETTINGS, "selected", "best_epoch"]
    header += [f"{stage}_{metric}" for stage in ("valid", "test") for metric in METRIC_NAMES]
    header += ["error"]
    reported = {id(entry) for entry in selected}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for entry in finished:
        result = result_metrics(entry.metrics)
        config = RunDirectory.open(entry.run).config
        writer.writerow(
            [
                entry.cell.section,
                entry.cell.row,
                entry.cell.peft or "",
                entry.metrics["method"],
                entry.seed,
                entry.run.relative_to(out).as_posix(),
                *("" if getattr(config, name) is None else f"{getattr(config, name):g}" for name in TUNED_SETTINGS),
                int(id(entry) in reported),
                result["best_epoch"],
                *(f"{result[stage][metric]:.6f}" for stage in ("valid", "test") for metric in METRIC_NAMES),
                "",
            ]
        )
    for failure in failed:
        changes, tuned = dict(failure.cell.changes), dict(failure.variant)
        writer.writerow(
            [
                failure.cell.section,
                failure.cell.row,
                failure.cell.peft or "",
                changes.get("method", ""),
                failure.seed,
                failure.run.relative_to(out).as_posix(),
                *("" if tuned.get(name) is None else f"{tuned[name]:g}" for name in TUNED_SETTINGS),
                0,
                "",
                *("" for _ in ("valid", "test") for _ in METRIC_NAMES),
                failure.reason,
            ]
        )
    return buffer.getvalue()


def failed_runs(failed: list[Failed], out: Path) -> list[str]:
    """The runs that failed, with their reasons: the tables above them are over the runs that finished."""
    rows = list({entry.run: entry for entry in failed}.values())
    return [
        f"### Failed runs ({len(rows)}): the tables are over the seeds that finished; rerunning the grid retries these",
        "",
        "| run | reason |",
        "|---|---|",
        *(f"| `{entry.run.relative_to(out).as_posix()}` | {entry.reason.replace('|', '/')} |" for entry in rows),
    ]


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
                "" if position else "N/A" if peft is None else PEFT_TITLES.get(peft, "N/A"),
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
    named = peft if peft is None else PEFT_TITLES.get(peft, peft)
    return [title.format(peft=named), "", *header, *_metric_table(rows, mark)]


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
            history = state.stage(stage).history
            per_stage[stage] = (
                statistics.mean(record.train_seconds for record in history),
                max(record.train_peak_bytes for record in history) / 2**20,
            )
        num_items = run_dataset(config).num_items
        if config.clip is None:
            raise ValueError(f"{entry.run}: its config names no CLIP (--clip)")
        counts = parameter_counts(config.clip, config.peft, config.groups, num_items)
        (global_s, global_mib), (perpeft_s, perpeft_mib) = per_stage["global"], per_stage["perpeft"]
        lines.append(
            f"| {PEFT_TITLES[config.peft]} | {global_s:.2f} | {perpeft_s:.2f} | {perpeft_s / global_s:.2f}× "
            f"| {global_mib:,.0f} | {perpeft_mib:,.0f} | {counts['global_peft_total']:,} "
            f"| {counts['perpeft_total']:,} | {counts['clip_frozen']:,} |"
        )
    return lines


def _setting(settings: RunConfig, name: str, tuned: Tuned | None) -> str:
    """A setting for the table's header line: its value, or the values a tuning grid tried."""
    if tuned is not None and name in tuned.grid:
        return "tuned over {" + ", ".join(f"{value:g}" for value in tuned.grid[name]) + "}"
    return f"{getattr(settings, name):g}"


def _id_rate(settings: RunConfig, tuned: Tuned | None) -> str:
    """The ID embeddings' learning rate for the header line, when it is not ``lr``."""
    if (tuned is not None and "id_lr" in tuned.grid) or settings.id_lr is not None:
        return f" (ID embeddings {_setting(settings, 'id_lr', tuned)})"
    return ""


def tuning_table(tuned: Tuned) -> list[str]:
    """Which tuned values each cell reports: the combination with the best mean validation metric."""
    selections = tuned.selections
    names = [name for name, _ in selections[0].variant]
    lines = [
        f"### Tuning: the values each row reports (best mean validation {SELECTION_METRIC} over seeds)",
        "",
        "| Section | Row | PEFT | "
        + " | ".join(names)
        + f" | valid {SHORT.get(SELECTION_METRIC, SELECTION_METRIC)} | of |",
        "|---|---|---|" + "---:|" * (len(names) + 2),
    ]
    for selection in selections:
        cell = selection.cell
        values = " | ".join(f"{value:g}" for _, value in selection.variant)
        peft = PEFT_TITLES.get(cell.peft, "N/A") if cell.peft else "N/A"
        lines.append(
            f"| {cell.section} | {cell.row} | {peft} | {values} | {100 * selection.valid:.2f} | {selection.candidates} |"
        )
    return lines


def tables_markdown(
    finished: list[Finished],
    base: RunConfig,
    seeds: list[int],
    reseeded: dict[int, Path] | None = None,
    tuned: Tuned | None = None,
    failed: list[Failed] | None = None,
    out: Path | None = None,
) -> str:
    """``table.md``: every requested section's table, laid out like the paper's, under the grid's settings;
    with ``tuned`` (a tuning grid) each cell at its selected combination, and which one that was; with
    ``failed``, those runs (relative to ``out``) and their reasons first."""
    sections = {entry.cell.section for entry in finished}
    dataset = Path(base.data).name
    settings = base.resolved()
    lines = [
        f"# Experiment on `{dataset}`, seeds {', '.join(map(str, seeds))}",
        "",
        f"Settings: E1 = {_setting(settings, 'epochs_global', tuned)}, "
        f"E2 = {_setting(settings, 'epochs_perpeft', tuned)} (single-stage methods train "
        f"E1 + E2 epochs), lr {_setting(settings, 'lr', tuned)}"
        f"{_id_rate(settings, tuned)}, "
        f"weight decay {_setting(settings, 'weight_decay', tuned)}, batch {settings.batch_size}"
        f"{'' if settings.train_windows == 'last' else f' (training windows: {settings.train_windows})'}, "
        f"C = {settings.groups} unless a row says otherwise. Test metrics at the best epoch by validation "
        f"{SELECTION_METRIC}, "
        "×100, mean (standard deviation) over seeds. Bold: best mean per column (per PEFT block in Table 2).",
        "",
    ]
    if failed:
        lines += [*failed_runs(failed, out or Path()), ""]
    if tuned is not None:
        lines += [*tuning_table(tuned), ""]
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
    if "divergence" in sections and (table := divergence_table(finished, reseeded or {})):
        lines += [*table, ""]
    return "\n".join(lines)
