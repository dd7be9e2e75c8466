"""The ``perpeft-engine`` command: parse, call ``perpeft.engine``, print."""

import atexit
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import click
from click.core import ParameterSource
from tqdm.auto import tqdm

from perpeft import __version__
from perpeft.cli.analyze import analyze
from perpeft.cli.distributed import relaunch_with_torchrun, runs_distributed
from perpeft.cli.errors import reports_input_errors
from perpeft.cli.experiment import experiment
from perpeft.cli.inference import embed, evaluate, export, recommend
from perpeft.cli.options import choice_option, config_default, run_options
from perpeft.cli.prepare import fetch_images, prepare
from perpeft.cli.serve import serve
from perpeft.engine.config.choices import CLUSTERING, GROUPING, PEFT
from perpeft.engine.config.methods import METHODS
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.eval.metrics import METRIC_NAMES, SELECTION_METRIC
from perpeft.engine.eval.report import relative_change, result_rows, still_improving
from perpeft.engine.runtime.memory import reuse_freed_memory


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="perpeft-engine")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    envvar="PERPEFT_THREADS",
    default=None,
    help="CPU threads per process (torch intra-op). [$PERPEFT_THREADS, else one per core]",
)
def cli(threads: int | None) -> None:
    """PerPEFT: personalized PEFT of CLIP for multimodal sequential recommendation."""
    _warnings_to_stderr()
    reuse_freed_memory()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _warnings_to_stderr() -> None:
    """The engine's warnings (a damaged file it fell back from or rebuilt, a lock it took over) as lines on
    this command's stderr, for as long as the command runs."""
    logger = logging.getLogger("perpeft")
    handler = logging.StreamHandler(sys.stderr)  # (a test runner's stream while it runs the command)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    click.get_current_context().call_on_close(lambda: logger.removeHandler(handler))


def metrics_table(metrics: dict[str, Any]) -> str:
    """Test metrics of the run's method; for PerPEFT, Global PEFT and PerPEFT side by side with the change."""
    peft = f" · {metrics['peft']}" if metrics.get("peft") else ""
    global_seed = f" (Global stage and groups of seed {metrics['global_seed']})" if "global_seed" in metrics else ""
    lines = [
        f"{metrics['dataset']} · {metrics['method']}{peft} · C={metrics['groups']} · seed {metrics['seed']}"
        f"{global_seed}  (test, best epoch by valid {SELECTION_METRIC})",
        f"{'':<22}" + "".join(f"{name:>10}" for name in METRIC_NAMES),
    ]
    rows = result_rows(metrics)
    lines += [f"{label:<22}" + "".join(f"{values[name]:>10.4f}" for name in METRIC_NAMES) for label, values in rows]
    if len(rows) == 2:
        change = relative_change(rows[0][1], rows[1][1])
        cells = [change[name] for name in METRIC_NAMES]
        lines.append(
            f"{'change':<22}"
            + "".join(f"{cell * 100:>+9.1f}%" if cell is not None else f"{'n/a':>10}" for cell in cells)
        )
    return "\n".join(lines)


@cli.command()
@run_options
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default=config_default("method"),
    show_default=True,
    help="PerPEFT, a Table 2 baseline, or large-global-peft (Table 3).",
)
@choice_option(PEFT)
@click.option(
    "--groups",
    type=click.IntRange(min=1),
    default=config_default("groups"),
    show_default=True,
    help="Number of user groups C.",
)
@click.option(
    "--text/--no-text",
    default=None,
    help="Encode item text; --no-text is the ablation that encodes images only. [when the catalog has text]",
)
@click.option(
    "--image/--no-image",
    default=None,
    help="Encode item images; --no-image is the ablation that encodes text only. [when the catalog has images]",
)
@click.option("--no-group-negatives", is_flag=True, help="Ablation: PerPEFT draws negatives from all items.")
@choice_option(GROUPING)
@choice_option(CLUSTERING)
@click.option("--no-baseline", is_flag=True, help="Stop Global PEFT at E1 instead of training the E1+E2 baseline.")
@click.option("--seed", type=int, default=config_default("seed"), show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory. [runs/DATA-[METHOD-]PEFT-seedN, METHOD unless perpeft]",
)
@click.option(
    "--resume", type=click.Path(path_type=Path), default=None, help="Continue the interrupted run in this directory."
)
@click.option(
    "--global-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Reuse this PerPEFT run's Global stage and groups; train only the second stage, with --seed "
    "(Table 7's intra-group runs). Takes every other setting from that run.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write per-epoch losses, metrics and item-vector norms as TensorBoard events here.",
)
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Data-parallel processes on this machine (relaunches under torchrun; one per GPU).",
)
@reports_input_errors
@runs_distributed("device")
def train(
    nproc: int | None,
    resume: Path | None,
    global_from: Path | None,
    out: Path | None,
    overwrite: bool,
    log_dir: Path | None,
    quiet: bool,
    no_baseline: bool,
    no_group_negatives: bool,
    **options: Any,
) -> None:
    """Train a method end to end (default PerPEFT, with its Global PEFT baseline) and print test metrics."""
    from perpeft.engine import api
    from perpeft.engine.runtime.distributed import launched_by_torchrun

    if nproc is not None and not launched_by_torchrun():
        relaunch_with_torchrun(nproc)
    shown: dict[str, Any] = {"progress": not quiet, "on_line": None if quiet else tqdm.write, "log_dir": log_dir}
    if resume is not None:
        if global_from is not None:
            raise InputError("--resume and --global-from: a resumed run already has its Global stage")
        run = api.resume(resume, **shown)
    elif global_from is not None:
        run = train_reseeded(global_from, out, overwrite, options, shown)
    else:
        config = RunConfig(baseline=not no_baseline, group_negatives=not no_group_negatives, **options)
        run = api.train(config, out, overwrite=overwrite, **shown)
    metrics = run.metrics
    click.echo(metrics_table(metrics))
    for warning in still_improving(metrics):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"run directory: {run.path}")


def train_reseeded(
    source_path: Path, out: Path | None, overwrite: bool, options: dict[str, Any], shown: dict[str, Any]
) -> Any:
    """``train --global-from RUN --seed N``: RUN's settings, Global stage and groups; second stage with seed N."""
    from perpeft.engine import api
    from perpeft.engine.train.reseed import RESEED_MACHINE_SETTINGS, check_reseed_settings

    context = click.get_current_context()
    given = [
        name
        for name in options
        if context.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    ]
    given += [name for name in ("no_baseline", "no_group_negatives") if context.params[name]]
    given = [f"no_{name}" if name in ("text", "image") and options[name] is False else name for name in given]
    check_reseed_settings(source_path, given)
    machine = {name: options[name] for name in RESEED_MACHINE_SETTINGS if name in given}
    return api.reseed(api.open_run(source_path), options["seed"], out, overwrite=overwrite, **shown, **machine)


@cli.command()
@click.option(
    "--clip",
    default="vit-b-32",
    show_default=True,
    help="Architecture alias (vit-b-32, tiny) or a local CLIP directory.",
)
@choice_option(PEFT)
@click.option("--groups", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--items", type=click.IntRange(min=1), required=True, help="Number of items in the catalog.")
@click.option(
    "--missing-modalities", is_flag=True, help="Count the placeholders used for items without an image or title."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_input_errors
def params(clip: str, peft: str, groups: int, items: int, missing_modalities: bool, as_json: bool) -> None:
    """Parameter count of each component, without loading weights (paper Table 8)."""
    from perpeft.engine import api

    counts = api.parameter_counts(items, clip=clip, peft=peft, groups=groups, missing_modalities=missing_modalities)
    if as_json:
        click.echo(json.dumps(counts, indent=2))
        return
    for name, count in counts.items():
        click.echo(f"{name:<22}{count:>14,}")


cli.add_command(prepare)
cli.add_command(embed)
cli.add_command(evaluate)
cli.add_command(recommend)
cli.add_command(export)
cli.add_command(serve)
cli.add_command(fetch_images)
cli.add_command(experiment)
cli.add_command(analyze)


def main() -> NoReturn:
    """The ``perpeft-engine`` command as a process: `cli` in click's standalone mode, then what Python's exit
    does first (threading's shutdown: its exit hooks, which let idle thread pools' workers go, such as
    torch.compile's compile pool, then the wait for non-daemon threads; the exit handlers), and out. The
    interpreter's own teardown (freeing the ~4,000 imported modules and the objects they hold, 1.3 s of a
    training job on a 2-core machine) is skipped: by then every file is written and closed, the exit
    handlers have run (logging's flush, TensorBoard's and torch's hooks) and the streams are flushed. An
    uncaught exception still propagates with its traceback, as Python exits on one."""
    try:
        cli.main(prog_name="perpeft-engine")
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    # What the interpreter's exit runs before the exit handlers. Joining the non-daemon threads without its
    # hooks would wait forever on a thread pool's idle workers.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what SystemExit does with a message
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a reader that went away: Python's own exit status for a failed flush
            code = code or 120
    os._exit(code or 0)
