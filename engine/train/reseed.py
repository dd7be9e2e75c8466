"""Reseeded runs (paper App. C.5.1): a new run that takes another run's Global stage and grouping and trains
the second stage with another seed."""

import dataclasses
from pathlib import Path
from typing import Any

from perpeft.engine.config.methods import method_of
from perpeft.engine.config.run_config import ResolvedConfig, RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.atomic import atomic_write_bytes
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_state import RunState

# Settings of the machine, not of the experiment: a run reusing another's Global stage may change them.
RESEED_MACHINE_SETTINGS = ("device", "precision", "compile")


def check_reseed_settings(source_path: Path, given: list[str]) -> None:
    """InputError unless the settings a user gave for a reseeded run (``given``: RunConfig field names and
    the ``no_*`` flags) are the seed, which is required, and machine settings: every other setting comes
    from the source run's config.json."""
    conflicting = [name for name in given if name not in ("seed", *RESEED_MACHINE_SETTINGS)]
    if conflicting:
        flags = ", ".join("--" + name.replace("_", "-") for name in conflicting)
        raise InputError(f"--global-from {source_path} takes every setting from that run's config.json; drop {flags}")
    if "seed" not in given:
        raise InputError("--global-from needs --seed: the second stage's seed, another than the run's own")


def reseeded_config(source: RunDirectory, seed: int, **machine: str) -> ResolvedConfig:
    """The configuration of a run that takes ``source``'s finished Global-PEFT stage and grouping and trains
    the second stage again with ``seed`` (paper App. C.5.1: the same groups, another seed): ``source``'s
    settings with ``seed``, ``global_seed`` = the seed that trained that stage, and ``machine`` settings
    (device, precision, compile) replaced. InputError when ``source`` has no finished stage to give."""
    config = source.config
    if not method_of(config).two_stage:
        raise InputError(f"{source.path}: a --method {config.method} run has no Global stage and grouping to reuse")
    state = source.read_state()
    if state.grouping is None or not (source.snapshot.is_file() and source.grouping.is_file()):
        raise InputError(
            f"{source.path}: its Global stage and grouping are not finished; finish it with `train --resume`"
        )
    if seed == config.seed:
        raise InputError(f"--seed {seed}: {source.path} trained its second stage with this seed; pick another")
    unknown = set(machine) - set(RESEED_MACHINE_SETTINGS)
    if unknown:
        raise ValueError(f"only the machine settings {RESEED_MACHINE_SETTINGS} may change, not {sorted(unknown)}")
    changes: dict[str, Any] = {"seed": seed, "global_seed": config.stage_seed("global"), **machine}
    return dataclasses.replace(config, **changes)


def shares_global_stage(config: RunConfig, other: RunConfig) -> bool:
    """Whether two configurations train the same Global stage and grouping: equal but for the second stage's
    seed and the machine settings."""
    neutral: dict[str, Any] = {"seed": 0, "global_seed": None, **{name: "auto" for name in RESEED_MACHINE_SETTINGS}}
    same_seed = config.stage_seed("global") == other.stage_seed("global")
    return same_seed and dataclasses.replace(config, **neutral) == dataclasses.replace(other, **neutral)


def reuse_global_stage(source: RunDirectory, run: RunDirectory) -> None:
    """Copy ``source``'s Global-PEFT stage (its checkpoints and E1 snapshot), grouping and their progress
    records into the new ``run``; `run_pipeline` then starts at the second stage. ``state.json`` is written
    last, so an interrupted copy leaves a run that retrains those steps from its own configuration."""
    for path in source.stage_files("global"):
        atomic_write_bytes(run.path / path.relative_to(source.path), path.read_bytes())
    atomic_write_bytes(run.grouping, source.grouping.read_bytes())
    state = source.read_state()
    run.write_state(RunState({"global": state.stage("global")}, state.grouping))
