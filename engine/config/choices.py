"""Every value a run setting allows, defined once: `RunConfig` validates against these and the CLI builds its
options (choices, defaults, help) from them. Methods have their own table (`methods.METHODS`)."""

from dataclasses import dataclass
from typing import Literal, get_args

from perpeft.engine.errors import InputError

# Each setting's values as a type (RunConfig's fields are annotated with these; a type checker refuses a
# typo) and, through `Choice`, as the CLI's choices: one list per setting.
PeftType = Literal["lora", "ia3", "iisan"]
GroupingKind = Literal["interest", "random"]
ClusteringKind = Literal["kmeans", "gmm"]
Precision = Literal["auto", "fp32", "bf16"]
CompileMode = Literal["auto", "on", "off"]
TrainWindows = Literal["last", "all", "prefix"]


@dataclass(frozen=True)
class Choice:
    """The allowed values of one setting, its default and the help line its CLI option shows."""

    option: str
    values: tuple[str, ...]
    default: str
    help: str

    def __post_init__(self) -> None:
        if self.default not in self.values:
            raise ValueError(f"{self.option}: default {self.default!r} is not one of {self.values}")

    def check(self, value: str, where: str = "") -> None:
        """InputError naming the option, the value and every allowed one, prefixed by ``where`` (a file)."""
        if value not in self.values:
            prefix = f"{where}: " if where else ""
            raise InputError(f"{prefix}{self.option} {value}: expected one of {', '.join(self.values)}")


PEFT = Choice(
    "--peft",
    get_args(PeftType),
    "lora",
    "PEFT type: LoRA and (IA)3 inside both CLIP towers, or the IISAN side network over cached hidden states.",
)
# The PEFT types that put adapters inside CLIP (peft exports them; attention analysis reads them).
ADAPTER_PEFTS = ("lora", "ia3")
GROUPING = Choice(
    "--grouping",
    get_args(GroupingKind),
    "interest",
    "interest: cluster Global-PEFT user vectors; random: the Table 3 ablation.",
)
CLUSTERING = Choice("--clustering", get_args(ClusteringKind), "kmeans", "Clustering of the user vectors (App. C.4.3).")
PRECISION = Choice("--precision", get_args(Precision), "auto", "auto: bf16 autocast on CUDA, fp32 on CPU.")
COMPILE = Choice("--compile", get_args(CompileMode), "auto", "torch.compile SASRec; auto: on CUDA only.")
TRAIN_WINDOWS = Choice(
    "--train-windows",
    get_args(TrainWindows),
    "last",
    "last: each user's most recent window (the paper); all: every training target once per epoch, in"
    " non-overlapping windows (long histories); prefix: one sample per training target with its full"
    " context (RecBole's), ~maxlen times the steps of all.",
)
RUN_CHOICES = {
    "peft": PEFT,
    "grouping": GROUPING,
    "clustering": CLUSTERING,
    "precision": PRECISION,
    "compile": COMPILE,
    "train_windows": TRAIN_WINDOWS,
}
# An item's two modalities, in the encoder's output order (image columns first).
MODALITIES = ("image", "title")
SEARCH_INDEX = Choice(
    "--index",
    ("exact", "hnsw"),
    "exact",
    "exact: score every item of the group's table; hnsw: approximate search (faiss HNSW graphs, the "
    "`ann` extra), for large catalogs.",
)

# Items per answer when a request names no k: the CLI, the Python API and the HTTP service alike.
DEFAULT_K = 10
