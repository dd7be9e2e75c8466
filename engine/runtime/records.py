"""The records a run writes, typed: ``state.json``'s per-epoch and best-epoch records and ``metrics.json``.

Each record's ``to_json`` gives the JSON object runs have always written (``atomic_write_json`` sorts the
keys), and ``from_json(values, where)`` reads one back, checked: an unexpected shape is an InputError naming
``where`` (the file and the record) in one line. Values are kept as read, so a record read and written again
is the same bytes.
"""

from dataclasses import dataclass
from typing import Any

from perpeft.engine.errors import InputError

# A run's training stages (the keys of state.json and metrics.json) and their names in reports.
STAGE_TITLES = {"global": "Global PEFT", "perpeft": "PerPEFT", "grouped": "Group-level"}
STAGES = tuple(STAGE_TITLES)

Scores = dict[str, float]  # metric name → value ("HR@10", …), or item-vector term → mean norm


def _fields(values: Any, required: tuple[str, ...], optional: tuple[str, ...], where: str) -> dict[str, Any]:
    """``values`` as a JSON object with every ``required`` key and no key outside ``optional``."""
    if not isinstance(values, dict):
        raise InputError(f"{where}: a JSON object expected, not {type(values).__name__}")
    missing = [key for key in required if key not in values]
    unknown = sorted(set(values) - {*required, *optional})
    if missing or unknown:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise InputError(f"{where}: keys {'; '.join(problems)}")
    return values


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: an integer expected, not {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{where}: a number expected, not {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: a string expected, not {value!r}")
    return value


def _scores(value: Any, where: str) -> Scores:
    if not isinstance(value, dict):
        raise InputError(f"{where}: a JSON object of numbers expected, not {type(value).__name__}")
    return {_text(name, where): _number(score, f"{where}.{name}") for name, score in value.items()}


EPOCH_KEYS = ("epoch", "loss", "seconds", "train_seconds", "train_peak_bytes", "valid", "test")


@dataclass(frozen=True)
class EpochRecord:
    """One trained epoch: its mean loss, wall and training seconds, training peak memory, validation and
    test metrics and the item vectors' term norms (`item_vector_norms`; absent in runs trained before)."""

    epoch: int
    loss: float
    seconds: float
    train_seconds: float
    train_peak_bytes: int
    valid: Scores
    test: Scores
    norms: Scores | None = None

    def to_json(self) -> dict[str, Any]:
        values = {
            "epoch": self.epoch,
            "loss": self.loss,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "train_peak_bytes": self.train_peak_bytes,
            "valid": self.valid,
            "test": self.test,
        }
        return values if self.norms is None else {**values, "norms": self.norms}

    @classmethod
    def from_json(cls, values: Any, where: str) -> "EpochRecord":
        """The record in ``values``; InputError naming ``where`` for any other shape."""
        values = _fields(values, EPOCH_KEYS, ("norms",), where)
        return cls(
            _int(values["epoch"], f"{where}.epoch"),
            _number(values["loss"], f"{where}.loss"),
            _number(values["seconds"], f"{where}.seconds"),
            _number(values["train_seconds"], f"{where}.train_seconds"),
            _int(values["train_peak_bytes"], f"{where}.train_peak_bytes"),
            _scores(values["valid"], f"{where}.valid"),
            _scores(values["test"], f"{where}.test"),
            _scores(values["norms"], f"{where}.norms") if "norms" in values else None,
        )


@dataclass(frozen=True)
class BestRecord:
    """A stage's best epoch so far by validation, and its validation and test metrics."""

    epoch: int
    valid: Scores
    test: Scores

    @classmethod
    def of(cls, record: EpochRecord) -> "BestRecord":
        return cls(record.epoch, record.valid, record.test)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "valid": self.valid, "test": self.test}

    @classmethod
    def from_json(cls, values: Any, where: str) -> "BestRecord":
        """The record in ``values``; InputError naming ``where`` for any other shape."""
        values = _fields(values, ("epoch", "valid", "test"), (), where)
        return cls(
            _int(values["epoch"], f"{where}.epoch"),
            _scores(values["valid"], f"{where}.valid"),
            _scores(values["test"], f"{where}.test"),
        )


@dataclass(frozen=True)
class StageSummary:
    """A finished stage in ``metrics.json``: its epochs, best epoch and that epoch's metrics; for a
    two-stage method's Global stage, which model it is (``baseline``: E1+E2 epochs, ``stage1``: E1)."""

    best_epoch: int
    epochs: int
    valid: Scores
    test: Scores
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        values = {"best_epoch": self.best_epoch, "epochs": self.epochs, "valid": self.valid, "test": self.test}
        return values if self.model is None else {**values, "model": self.model}

    @classmethod
    def from_json(cls, values: Any, where: str) -> "StageSummary":
        """The summary in ``values``; InputError naming ``where`` for any other shape."""
        values = _fields(values, ("best_epoch", "epochs", "valid", "test"), ("model",), where)
        return cls(
            _int(values["best_epoch"], f"{where}.best_epoch"),
            _int(values["epochs"], f"{where}.epochs"),
            _scores(values["valid"], f"{where}.valid"),
            _scores(values["test"], f"{where}.test"),
            _text(values["model"], f"{where}.model") if "model" in values else None,
        )


RUN_KEYS = ("dataset", "method", "peft", "groups", "seed", "result")


@dataclass(frozen=True)
class RunMetrics:
    """A finished run's ``metrics.json``: what was trained (dataset, method, PEFT type or None, groups, seed,
    the Global stage's seed where another run's was reused), the stage that is the method's result, and
    every trained stage's summary (its key in the file is the stage's name)."""

    dataset: str
    method: str
    peft: str | None
    groups: int
    seed: int
    global_seed: int | None
    result: str
    stages: dict[str, StageSummary]

    def to_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "dataset": self.dataset,
            "method": self.method,
            "peft": self.peft,
            "groups": self.groups,
            "seed": self.seed,
        }
        if self.global_seed is not None:
            values["global_seed"] = self.global_seed
        values["result"] = self.result
        return {**values, **{name: summary.to_json() for name, summary in self.stages.items()}}

    @classmethod
    def from_json(cls, values: Any, where: str) -> "RunMetrics":
        """The metrics in ``values``; InputError naming ``where`` ("not a run's metrics") for any other shape."""
        where = f"{where}: not a run's metrics"
        values = _fields(values, RUN_KEYS, ("global_seed", *STAGES), where)
        summaries = {
            name: StageSummary.from_json(values[name], f"{where}: {name}") for name in STAGES if name in values
        }
        result = _text(values["result"], f"{where}: result")
        if result not in summaries:
            raise InputError(f"{where}: the result's stage {result!r} has no entry")
        peft = values["peft"]
        return cls(
            _text(values["dataset"], f"{where}: dataset"),
            _text(values["method"], f"{where}: method"),
            None if peft is None else _text(peft, f"{where}: peft"),
            _int(values["groups"], f"{where}: groups"),
            _int(values["seed"], f"{where}: seed"),
            _int(values["global_seed"], f"{where}: global_seed") if "global_seed" in values else None,
            result,
            summaries,
        )
