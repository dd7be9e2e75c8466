"""Options that several commands share, built from the engine's one definition of each allowed value and
preset (`engine.config.choices`, `engine.config.run_config`): a help text cannot drift from the code."""

import dataclasses
from collections.abc import Callable
from typing import Any

import click

from perpeft.engine.config.choices import COMPILE, PRECISION, TRAIN_WINDOWS, Choice
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
        "--text-fields",
        default=None,
        help="Item-file columns joined into an item's text, comma-separated (e.g. movie_title,class). [title]",
    ),
    click.option(
        "--clip",
        default=None,
        help=preset_help("'tiny', a local HF CLIP directory, or a model id in the local HF cache.", "clip"),
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=config_default("batch_size"),
        show_default=True,
        help="Training windows (users with --train-windows last) per batch.",
    ),
    choice_option(TRAIN_WINDOWS),
    click.option(
        "--device",
        default=config_default("device"),
        show_default=True,
        help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'…",
    ),
    choice_option(PRECISION),
    choice_option(COMPILE),
)


# The schedule settings an experiment can tune: (option, setting, type, help).
SCHEDULE = (
    ("--epochs-global", "epochs_global", int, "E1, Global PEFT epochs before grouping."),
    ("--epochs-perpeft", "epochs_perpeft", int, "E2, PerPEFT epochs."),
    ("--lr", "lr", float, "AdamW learning rate."),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay."),
    ("--id-lr", "id_lr", float, "Learning rate of the item-ID embeddings."),
)
DEFAULT_OF = {"id_lr": "[--lr]"}  # schedule settings without a preset: what they default to


def schedule_help(text: str, setting: str) -> str:
    """A schedule option's help: ``text`` and its presets, or what it defaults to."""
    return preset_help(text, setting) if setting in DEMO_DEFAULTS else f"{text} {DEFAULT_OF[setting]}"


def schedule_options(tunable: bool) -> tuple[Decorator, ...]:
    """E1, E2, the learning rates and weight decay: one value each, or (``tunable``) comma-separated values
    that an experiment tries, selecting per cell by validation."""
    options = []
    for option, setting, kind, text in SCHEDULE:
        if tunable:
            help_text = schedule_help(f"{text} Several, comma-separated, are tuned by validation.", setting)
            options.append(click.option(option, default=None, callback=_values_of(kind), help=help_text))
        else:
            value_type = click.IntRange(min=1) if kind is int else float
            options.append(click.option(option, type=value_type, default=None, help=schedule_help(text, setting)))
    return tuple(options)


def _values_of(kind: type) -> Callable[[click.Context, click.Parameter, str | None], list[Any] | None]:
    def parse(context: click.Context, parameter: click.Parameter, value: str | None) -> list[Any] | None:
        if value is None:
            return None
        try:
            values = [kind(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected comma-separated {kind.__name__} values") from None
        if not values or (kind is int and min(values) < 1):
            raise click.BadParameter(f"{value!r}: expected comma-separated positive values")
        return values

    return parse


def run_options(command: Callable[..., Any], tunable: bool = False) -> Callable[..., Any]:
    """The data, model-source, schedule and machine options `train` and `experiment` share; ``tunable``
    makes the schedule options take several values."""
    for option in reversed((*RUN_OPTIONS, *schedule_options(tunable))):
        command = option(command)
    return command


def tunable_run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`run_options` with schedule options that take several comma-separated values (`experiment`)."""
    return run_options(command, tunable=True)
