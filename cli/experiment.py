"""``perpeft-engine experiment``: the paper's tables as resumable grids of runs."""

import time
from pathlib import Path
from typing import Any

import click
from tqdm.auto import tqdm

from perpeft.cli.errors import reports_input_errors
from perpeft.cli.options import SCHEDULE, config_default, tunable_run_options
from perpeft.engine.config.choices import CLUSTERING, PEFT


class OneGroupCount(click.IntRange):
    """``--groups``: one C for every cell, as ``train --groups``; a list names the Figure 7(b) option."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and "," in value:
            self.fail(f"{value!r}: one C for every cell; Figure 7(b)'s cells over C are --group-counts {value}")
        return super().convert(value, param, ctx)


def _list(value: str, convert: type = str) -> list:
    """A comma-separated option value as a list, empty for an empty string."""
    try:
        return [convert(part.strip()) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a comma-separated list of {convert.__name__}") from None


@click.command()
@tunable_run_options
@click.option("--peft", "pefts", default=PEFT.default, show_default=True, help="PEFT types, comma-separated.")
@click.option(
    "--methods", default="", help="Table 2: 'all' or comma-separated methods (wo-mm, frozen-mm, global-peft, …)."
)
@click.option("--ablations", is_flag=True, help="Table 3 with the first PEFT type.")
@click.option("--clustering", "clusterings", default="", help="Table 6: e.g. kmeans,gmm (paired t-test for two).")
@click.option(
    "--groups",
    type=OneGroupCount(min=1),
    default=config_default("groups"),
    show_default=True,
    help="Number of user groups C of every cell.",
)
@click.option("--group-counts", default="", help="Figure 7(b): PerPEFT cells at each C, e.g. 4,8,16.")
@click.option("--scalability", is_flag=True, help="Per-epoch time, peak memory and parameters per PEFT type.")
@click.option(
    "--divergence",
    is_flag=True,
    help="Table 7 with the first PEFT type (LoRA or (IA)3): attention JSD between groups and between seeds.",
)
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds, comma-separated.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Experiment directory (resumable).")
@reports_input_errors
def experiment(
    pefts: str,
    methods: str,
    ablations: bool,
    clusterings: str,
    groups: int,
    group_counts: str,
    scalability: bool,
    divergence: bool,
    seeds: str,
    out: Path,
    **options: Any,
) -> None:
    """Run a grid of cells × seeds, skipping finished runs, and write results.csv and table.md."""
    from perpeft.engine import api
    from perpeft.engine.config.methods import TABLE2_METHODS
    from perpeft.engine.experiments.runner import RESULTS_CSV, TABLE_MD

    peft_list = _list(pefts)
    if not peft_list or any(peft not in PEFT.values for peft in peft_list):
        raise click.BadParameter(f"{pefts!r}: expected {', '.join(PEFT.values)}", param_hint="--peft")
    clustering_list = _list(clusterings)
    if any(name not in CLUSTERING.values for name in clustering_list):
        raise click.BadParameter(f"{clusterings!r}: expected {', '.join(CLUSTERING.values)}", param_hint="--clustering")
    group_list = _list(group_counts, int)
    if any(count < 1 for count in group_list):
        raise click.BadParameter(f"{group_counts!r}: group counts must be positive", param_hint="--group-counts")
    method_list = list(TABLE2_METHODS) if methods == "all" else _list(methods)
    started = time.perf_counter()
    given = {setting: options.pop(setting) for _, setting, _, _ in SCHEDULE}
    tuning: dict[str, list[Any]] = {setting: values for setting, values in given.items() if values is not None}
    api.experiment(
        api.RunConfig(baseline=False, groups=groups, **options),
        out,
        pefts=peft_list,
        methods=method_list,
        seeds=_list(seeds, int),
        ablations=ablations,
        clusterings=clustering_list,
        group_counts=group_list,
        scalability=scalability,
        divergence=divergence,
        tuning=tuning,
        on_line=tqdm.write,
    )
    click.echo((out / TABLE_MD).read_text())
    click.echo(f"results: {out / RESULTS_CSV}  ·  wall time of this invocation: {time.perf_counter() - started:.0f} s")
