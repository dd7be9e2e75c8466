"""The paper's methods (Table 2) and ablations (Table 3) as configurations of the one training loop.

Every method runs ``run_pipeline``'s stages; a method only decides which item encoder the stages get
(none, frozen CLIP, CLIP with adapters), whether SASRec sees a learned user or group embedding, and whether
a second stage trains per-group adapters (PerPEFT) or a group embedding (Group-level) after the grouping.
"""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from .config import RunConfig


@dataclass(frozen=True)
class Method:
    """How one method configures the training loop."""

    name: str
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


METHODS = {
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
LARGE_TOLERANCE = 1_000  # paper §4.6.1: Large Global PEFT matches PerPEFT's count within ±10^3
TABLE2_METHODS = tuple(name for name, method in METHODS.items() if not method.large)  # Table 2's rows, in order


def method_of(config: "RunConfig") -> Method:
    """The run's ``Method``; InputError for an unknown name."""
    try:
        return METHODS[config.method]
    except KeyError:
        raise InputError(f"--method {config.method}: unknown method (known: {', '.join(METHODS)})") from None


def check_method(config: "RunConfig") -> None:
    """Refuse settings a method cannot honour, with one line saying why."""
    method = method_of(config)
    if config.grouping not in ("interest", "random"):
        raise InputError(f"--grouping {config.grouping}: expected interest or random")
    if config.clustering not in ("kmeans", "gmm"):
        raise InputError(f"--clustering {config.clustering}: expected kmeans or gmm")
    if not (config.text or config.image):
        raise InputError("--no-text and --no-image together leave no modality: use --method wo-mm")
    if (not config.text or not config.image) and method.encoder == "none":
        raise InputError("--no-text / --no-image: --method wo-mm uses no modality to drop")
    if (not config.text or not config.image) and method.uses_peft and config.peft == "iisan":
        raise InputError("--no-text / --no-image: IISAN's inter-modal chain needs both modalities (use lora or ia3)")
    if config.global_seed is not None and not method.two_stage:
        raise InputError(
            f"--method {config.method} has a single stage: a Global stage of another seed (--global-from) needs "
            "a two-stage method"
        )
    if method.large and config.peft != "lora":
        raise InputError(
            f"--method large-global-peft sizes LoRA's rank (the paper's ablation uses LoRA); --peft {config.peft} "
            "has no rank to grow"
        )


def large_adapter_config(config: "RunConfig") -> tuple["RunConfig", dict[str, int]]:
    """Large Global PEFT's settings and both adapter counts.

    LoRA's count is linear in the rank, so one adapter of rank C·r has exactly the count of PerPEFT's C
    adapters of rank r; alpha grows with it so the LoRA scaling alpha/r stays the paper's 2.0.
    """
    from .params import parameter_counts

    large = dataclasses.replace(
        config, lora_rank=config.groups * config.lora_rank, lora_alpha=config.groups * config.lora_alpha
    )
    per_group = parameter_counts(config.clip, "lora", 1, 1, lora_rank=config.lora_rank)["peft_per_group"]
    single = parameter_counts(config.clip, "lora", 1, 1, lora_rank=large.lora_rank)["peft_per_group"]
    counts = {"large_global_peft_adapter": single, "perpeft_adapters_total": config.groups * per_group}
    if abs(counts["large_global_peft_adapter"] - counts["perpeft_adapters_total"]) > LARGE_TOLERANCE:
        raise InputError(
            f"large-global-peft: no LoRA rank within ±{LARGE_TOLERANCE:,} parameters of PerPEFT ({counts})"
        )
    return large, counts
