"""Options that several commands share, built from the engine's one definition of each allowed value and
preset (`engine.config.choices`, `engine.config.run_config`): a help text cannot drift from the code."""

import dataclasses
from collections.abc import Callable
from typing import Any

import click

from perpeft.engine.config.choices import COMPILE, PRECISION, Choice
from perpeft.engine.config.run_config import DEMO_DEFAULTS, PAPER_DEFAULTS, RunConfig

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def config_default(setting: str) -> Any:
    """``RunConfig``'s default for ``setting``, so an option's default is the engine's."""
    return next(field.default for field in dataclasses.fields(RunConfig) if field.name == setting)


def preset_help(text: str, setting: str) -> str:
    """``text`` and the setting's presets, e.g. ``E2, PerPEFT epochs. [demo: 12, else 20]``."""
    demo, paper = DEMO_DEFAULTS[setting], PAPER_DEFAULTS[setting]
    if paper is None:
        return f"{text} [demo: {demo}]"
    return f"{text} [{demo}]" if demo == paper else f"{text} [demo: {demo}, else {paper}]"


def choice_option(choice: Choice, *names: str, help: str | None = None) -> Decorator:
    """A ``click.Choice`` option of ``choice``'s values and default."""
    return click.option(
        choice.option,
        *names,
        type=click.Choice(choice.values),
        default=choice.default,
        show_default=True,
        help=help or choice.help,
    )


RUN_OPTIONS: tuple[Decorator, ...] = (
    click.option(
        "--data",
        default=config_default("data"),
        show_default=True,
        help="'demo', a prepared named dataset (arts, sports, toys, beauty) or a RecBole-style dataset directory.",
    ),
    click.option(
        "--data-dir", default=None, help="Where named datasets live. [$PERPEFT_DATA, else ~/.cache/perpeft-engine/data]"
    ),
    click.option(
        "--clip",
        default=None,
        help=preset_help("'tiny', a local HF CLIP directory, or a model id in the local HF cache.", "clip"),
    ),
    click.option(
        "--epochs-global",
        type=click.IntRange(min=1),
        default=None,
        help=preset_help("E1, Global PEFT epochs before grouping.", "epochs_global"),
    ),
    click.option(
        "--epochs-perpeft",
        type=click.IntRange(min=1),
        default=None,
        help=preset_help("E2, PerPEFT epochs.", "epochs_perpeft"),
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=config_default("batch_size"),
        show_default=True,
        help="Users per batch.",
    ),
    click.option("--lr", type=float, default=None, help=preset_help("AdamW learning rate.", "lr")),
    click.option("--weight-decay", type=float, default=None, help=preset_help("AdamW weight decay.", "weight_decay")),
    click.option(
        "--device",
        default=config_default("device"),
        show_default=True,
        help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'…",
    ),
    choice_option(PRECISION),
    choice_option(COMPILE),
)


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The data, model-source, schedule and machine options `train` and `experiment` share."""
    for option in reversed(RUN_OPTIONS):
        command = option(command)
    return command
