"""A run's progress (``state.json``), typed: what resume, reseeding, embedding and the experiment tables read.

The JSON layout is the one runs have always written, so old run directories still resume::

    {"global": {"completed_epochs": 4, "history": [...], "best": {...}},
     "grouping": {"sizes": [...], "grouping": "interest", "clustering": "kmeans"},
     "perpeft": {...}, "done": true}
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from perpeft.engine.errors import InputError
from perpeft.engine.runtime.records import STAGES, BestRecord, EpochRecord


@dataclass
class StageProgress:
    """One stage: epochs completed, one record per epoch, the best epoch so far."""

    completed_epochs: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best: BestRecord | None = None

    def to_json(self) -> dict[str, Any]:
        values = {"completed_epochs": self.completed_epochs, "history": [record.to_json() for record in self.history]}
        return values if self.best is None else {**values, "best": self.best.to_json()}

    @classmethod
    def from_json(cls, values: Any, where: str) -> "StageProgress":
        """The stage's progress in ``values``; InputError naming ``where`` for any other shape."""
        if not isinstance(values, dict) or not set(values) <= STAGE_KEYS:
            raise InputError(f"{where}: a JSON object of {sorted(STAGE_KEYS)} expected")
        completed, history = values.get("completed_epochs", 0), values.get("history", [])
        if isinstance(completed, bool) or not isinstance(completed, int) or not isinstance(history, list):
            raise InputError(f"{where}: completed_epochs (an integer) and history (a list) expected")
        records = [EpochRecord.from_json(record, f"{where}: history[{index}]") for index, record in enumerate(history)]
        best = BestRecord.from_json(values["best"], f"{where}: best") if "best" in values else None
        return cls(completed, records, best)


STAGE_KEYS = {"completed_epochs", "history", "best"}


@dataclass(frozen=True)
class GroupingRecord:
    """How the run grouped its users: group sizes and the grouping settings that produced them."""

    sizes: list[int]
    grouping: str
    clustering: str


@dataclass
class RunState:
    """Every stage's progress, the grouping once done, and whether the run finished."""

    stages: dict[str, StageProgress] = field(default_factory=dict)
    grouping: GroupingRecord | None = None
    done: bool = False

    def stage(self, name: str) -> StageProgress:
        """``name``'s progress, created empty on first use."""
        return self.stages.setdefault(name, StageProgress())

    def to_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {name: progress.to_json() for name, progress in self.stages.items()}
        if self.grouping is not None:
            values["grouping"] = asdict(self.grouping)
        if self.done:
            values["done"] = True
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str) -> "RunState":
        """The state in ``values``; InputError naming ``where`` (the file) for keys no run writes."""
        if not isinstance(values, dict):
            raise InputError(f"{where}: not a run's progress (a JSON object expected)")
        unknown = sorted(set(values) - {*STAGES, "grouping", "done"})
        if unknown:
            raise InputError(f"{where}: unknown progress keys {unknown}")
        stages = {
            name: StageProgress.from_json(values[name], f"{where}: malformed progress record of stage {name!r}")
            for name in STAGES
            if name in values
        }
        try:
            grouping = GroupingRecord(**values["grouping"]) if "grouping" in values else None
        except TypeError as error:
            raise InputError(f"{where}: malformed progress record ({error})") from None
        return cls(stages, grouping, bool(values.get("done", False)))
