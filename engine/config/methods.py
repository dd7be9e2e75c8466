"""The paper's methods (Table 2) and ablations (Table 3) as configurations of the one training loop.

Every method runs ``run_pipeline``'s stages; a method only decides which item encoder the stages get
(none, frozen CLIP, CLIP with adapters), whether SASRec sees a learned user or group embedding, and whether
a second stage trains per-group adapters (PerPEFT) or a group embedding (Group-level) after the grouping.
"""

from dataclasses import dataclass
from typing import Literal, Protocol

from perpeft.engine.errors import InputError

# The method names, as a type for RunConfig's ``method`` field; `METHODS` defines each, in this order.
MethodName = Literal[
    "wo-mm",
    "frozen-mm",
    "global-peft",
    "user-level-1",
    "user-level-2",
    "group-level-1",
    "group-level-2",
    "perpeft",
    "large-global-peft",
]


class NamesAMethod(Protocol):
    """Anything with a ``method`` name (a RunConfig): `method_of` needs nothing else of it."""

    @property
    def method(self) -> str: ...


@dataclass(frozen=True)
class Method:
    """How one method configures the training loop."""

    name: MethodName
    title: str
    encoder: str  # "none": ID embeddings only; "frozen": CLIP without adapters; "adapted": CLIP + PEFT
    personal: str | None = None  # "user" or "group": a learned embedding fed to SASRec (Types 4 and 5)
    personal_mode: int = 0  # 1: appended to the sequence as an extra element; 2: concatenated to every item
    grouped_adapters: bool = False  # PerPEFT: C adapters + projectors after the grouping
    large: bool = False  # one adapter as large as PerPEFT's C adapters together

    @property
    def two_stage(self) -> bool:
        """Whether the method groups users after E1 Global PEFT epochs and trains a second stage."""
        return self.grouped_adapters or self.personal == "group"

    @property
    def uses_peft(self) -> bool:
        """Whether ``--peft`` matters: w/o MM and Frozen MM are the same for every PEFT type."""
        return self.encoder == "adapted"


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("wo-mm", "w/o MM", "none"),
        Method("frozen-mm", "Frozen MM", "frozen"),
        Method("global-peft", "Global PEFT", "adapted"),
        Method("user-level-1", "User-level 1", "adapted", personal="user", personal_mode=1),
        Method("user-level-2", "User-level 2", "adapted", personal="user", personal_mode=2),
        Method("group-level-1", "Group-level 1", "adapted", personal="group", personal_mode=1),
        Method("group-level-2", "Group-level 2", "adapted", personal="group", personal_mode=2),
        Method("perpeft", "PerPEFT", "adapted", grouped_adapters=True),
        Method("large-global-peft", "Large Global PEFT", "adapted", large=True),
    )
}
TABLE2_METHODS = tuple(name for name, method in METHODS.items() if not method.large)  # Table 2's rows, in order


def method_of(config: NamesAMethod) -> Method:
    """The run's ``Method``; InputError for an unknown name."""
    try:
        return METHODS[config.method]
    except KeyError:
        raise InputError(f"--method {config.method}: unknown method (known: {', '.join(METHODS)})") from None
