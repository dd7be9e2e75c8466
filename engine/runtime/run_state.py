"""A run's progress (``state.json``), typed: what resume, reseeding, embedding and the experiment tables read.

The JSON layout is the one runs have always written, so old run directories still resume::

    {"global": {"completed_epochs": 4, "history": [...], "best": {...}},
     "grouping": {"sizes": [...], "grouping": "interest", "clustering": "kmeans"},
     "perpeft": {...}, "done": true}
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from perpeft.engine.errors import InputError

# A run's training stages (the keys of state.json and metrics.json) and their names in reports.
STAGE_TITLES = {"global": "Global PEFT", "perpeft": "PerPEFT", "grouped": "Group-level"}
STAGES = tuple(STAGE_TITLES)


@dataclass
class StageProgress:
    """One stage: epochs completed, one record per epoch (loss, seconds, peak memory, metrics), the best."""

    completed_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        values = {"completed_epochs": self.completed_epochs, "history": self.history}
        return values if self.best is None else {**values, "best": self.best}


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
        try:
            stages = {name: StageProgress(**values[name]) for name in STAGES if name in values}
            grouping = GroupingRecord(**values["grouping"]) if "grouping" in values else None
        except TypeError as error:
            raise InputError(f"{where}: malformed progress record ({error})") from None
        for name, stage in stages.items():
            if not isinstance(stage.completed_epochs, int) or not isinstance(stage.history, list):
                raise InputError(f"{where}: malformed progress record of stage {name!r}")
        return cls(stages, grouping, bool(values.get("done", False)))
