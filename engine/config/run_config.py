"""One RunConfig holding every setting of a run, written to and read from ``config.json``."""

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from perpeft.engine.config.choices import (
    ClusteringKind,
    CompileMode,
    GroupingKind,
    PeftType,
    Precision,
    TrainWindows,
)
from perpeft.engine.config.methods import MethodName, method_of
from perpeft.engine.errors import InputError

# The paper's settings (App. C.2) apply to real data; the demo is ~20× smaller, so it takes fewer,
# larger-step epochs to converge inside the three-minute budget.
PAPER_DEFAULTS: dict[str, Any] = {
    "epochs_global": 10,
    "epochs_perpeft": 20,
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "clip": None,
}
DEMO_DEFAULTS: dict[str, Any] = {
    "epochs_global": 6,
    "epochs_perpeft": 12,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "clip": "tiny",
}


MISSING_CLIP = "--clip is required for real data: a local HF CLIP directory or a cached model id"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA's shape: rank r, scale numerator alpha (the update is scaled by alpha / r) and input dropout."""

    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.1


PAPER_LORA = LoraSettings()  # the paper's r = 4, alpha = 8, dropout 0.1 (App. C.2)


@dataclass(frozen=True)
class RunConfig:
    """Every hyperparameter, path and switch of a training run; ``None`` fields take the dataset's preset
    (`resolved`).

    The fields, by what they set — data: ``data``, ``data_dir``, ``text_fields``, ``text``, ``image``;
    method: ``method``, ``peft``, ``groups``, ``grouping``, ``clustering``, ``baseline``,
    ``group_negatives``; model: ``clip``, ``maxlen``, ``hidden``, ``dropout``; adapters: ``lora_rank``,
    ``lora_alpha``, ``lora_dropout`` (`lora`); schedule: ``epochs_global``, ``epochs_perpeft``,
    ``batch_size``, ``lr``, ``id_lr``, ``weight_decay``, ``train_windows``, ``seed``, ``global_seed``;
    runtime: ``device``, ``precision``, ``compile``, ``eval_batch_size``, ``encode_batch_size``. The CLI's
    options have the same names (``--epochs-global`` for ``epochs_global``).

    Refused at construction (`InputError`, one line naming the setting): a value of the wrong type, a
    choice no setting allows, a count below its minimum, a combination the method cannot honour.
    """

    data: str = "demo"
    method: MethodName = "perpeft"
    data_dir: str | None = None
    clip: str | None = None
    peft: PeftType = "lora"
    groups: int = 8
    epochs_global: int | None = None
    epochs_perpeft: int | None = None
    baseline: bool = True
    batch_size: int = 16
    lr: float | None = None
    id_lr: float | None = None  # the ID embeddings' learning rate; None: ``lr``
    weight_decay: float | None = None
    seed: int = 0
    global_seed: int | None = None
    device: str = "auto"
    precision: Precision = "auto"
    compile: CompileMode = "auto"
    maxlen: int = 10
    hidden: int = 32
    dropout: float = 0.3
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    group_negatives: bool = True
    text: bool | None = None  # None: encode the modality when the catalog has it
    image: bool | None = None
    text_fields: str | None = None  # item-file columns joined into an item's text, comma-separated
    train_windows: TrainWindows = "last"
    grouping: GroupingKind = "interest"
    clustering: ClusteringKind = "kmeans"
    eval_batch_size: int = 1024
    encode_batch_size: int = 256

    def __post_init__(self) -> None:
        for setting in dataclasses.fields(self):
            _check_type(setting.name, getattr(self, setting.name), setting.type)
        self._check_ranges()
        _check_method(self)

    def resolved(self) -> "ResolvedConfig":
        """Fill every ``None`` from the demo preset (``--data demo``) or the paper's settings (item-ID methods
        need no CLIP)."""
        preset = DEMO_DEFAULTS if self.data == "demo" else PAPER_DEFAULTS
        values = dataclasses.asdict(self)
        values.update({key: value for key, value in preset.items() if values[key] is None})
        if values["clip"] is None and method_of(self).encoder != "none":
            raise InputError(MISSING_CLIP)
        return ResolvedConfig(**values)

    def _check_ranges(self) -> None:
        """InputError for a count or rate out of its range."""
        if self.id_lr is not None and self.id_lr <= 0:
            raise InputError(f"--id-lr {self.id_lr}: must be positive")
        positive = ("groups", "epochs_global", "batch_size", "maxlen", "hidden", "lora_rank", "lr")
        for name in (*positive, "eval_batch_size", "encode_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"--{name.replace('_', '-')} {value}: must be positive")
        for name in ("dropout", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be in [0, 1)")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise InputError(f"--weight-decay {self.weight_decay}: must be ≥ 0")
        if self.epochs_perpeft is not None and self.epochs_perpeft < 0:
            raise InputError(f"--epochs-perpeft {self.epochs_perpeft}: must be ≥ 0")

    @property
    def clip_model(self) -> str:
        """``clip``, which every method with a CLIP encoder needs: InputError when it is unset."""
        if self.clip is None:
            raise InputError(MISSING_CLIP)
        return self.clip

    @property
    def lora(self) -> LoraSettings:
        """The adapters' LoRA settings as one value."""
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout)

    @property
    def text_field_names(self) -> tuple[str, ...] | None:
        """``text_fields`` as a tuple of column names (None: the loader's default)."""
        if self.text_fields is None:
            return None
        return tuple(field.strip() for field in self.text_fields.split(","))

    def for_catalog(self, has_text: bool, has_images: bool, where: str) -> Self:
        """The modalities this run encodes on a catalog (``where``, its directory): an unset one is encoded
        when the catalog has it; asking for one the catalog lacks, or leaving nothing to encode, is an
        InputError. Item-ID methods use no modality and record both as not dropped."""
        if method_of(self).encoder == "none":
            return dataclasses.replace(self, text=self.text is not False, image=self.image is not False)
        if self.image and not has_images:
            raise InputError(f"{where}: the catalog has no images (no images/ directory): drop --image")
        if self.text and not has_text:
            raise InputError(f"{where}: the catalog has no item text: drop --text")
        if not (has_text or has_images):
            raise InputError(f"{where}: the catalog has neither item text nor images: use --method wo-mm")
        text = has_text if self.text is None else self.text
        image = has_images if self.image is None else self.image
        lacking = "no images" if not has_images else "no item text"
        if not (text or image):
            raise InputError(
                f"{where}: the catalog has {lacking} and --no-{'image' if has_images else 'text'} drops"
                " the other modality: nothing to encode"
            )
        if self.peft == "iisan" and method_of(self).uses_peft and not (text and image):
            raise InputError(
                f"{where}: the catalog has {lacking}: IISAN's inter-modal chain needs both modalities"
                " (use --peft lora or ia3)"
            )
        return dataclasses.replace(self, text=text, image=image)

    def stage_seed(self, stage: str) -> int:
        """The seed of ``stage`` ("global", "grouping", "perpeft" or "grouped"): ``global_seed`` drives the
        Global-PEFT stage and the grouping when set (a run that reuses another seed's Global stage), else
        ``seed`` drives every stage."""
        if self.global_seed is not None and stage in ("global", "grouping"):
            return self.global_seed
        return self.seed

    def to_json(self) -> str:
        """The ``config.json`` text: every field, keys sorted."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: Path) -> Self:
        """The configuration a ``config.json`` holds; InputError naming the file for anything else."""
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: cannot read the run configuration ({error})") from None
        known = {setting.name for setting in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{path}: unknown configuration keys {unknown}")
        try:
            return cls(**values)
        except InputError as error:
            raise InputError(f"{path}: {error}") from None


@dataclass(frozen=True, kw_only=True)
class ResolvedConfig(RunConfig):
    """A RunConfig with its presets filled (`RunConfig.resolved`): what a run trains with and writes to its
    ``config.json``. The schedule is never ``None`` here."""

    # field(): no default (a bare annotation would inherit RunConfig's None).
    epochs_global: int = field()
    epochs_perpeft: int = field()
    lr: float = field()
    weight_decay: float = field()


def _check_type(name: str, value: object, annotation: object) -> None:
    """InputError unless ``value`` is of the field's declared type (``int`` where a count is, never a bool;
    an int where a float is; one of a Literal's values; ``None`` only where the field admits it)."""
    option = f"--{name.replace('_', '-')}"
    if typing.get_origin(annotation) is Literal:
        if value not in typing.get_args(annotation):
            raise InputError(f"{option} {value}: expected one of {', '.join(typing.get_args(annotation))}")
        return
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None and type(None) in allowed:
        return
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
    names = " or ".join("None" if kind is type(None) else getattr(kind, "__name__", str(kind)) for kind in allowed)
    raise InputError(f"{option} {value!r}: expected {names}")


def _check_method(config: RunConfig) -> None:
    """Refuse settings a method cannot honour, with one line saying why."""
    method = method_of(config)
    dropped = config.text is False or config.image is False
    if config.text is False and config.image is False:
        raise InputError("--no-text and --no-image together leave no modality: use --method wo-mm")
    if dropped and method.encoder == "none":
        raise InputError("--no-text / --no-image: --method wo-mm uses no modality to drop")
    if dropped and method.uses_peft and config.peft == "iisan":
        raise InputError("--no-text / --no-image: IISAN's inter-modal chain needs both modalities (use lora or ia3)")
    names = config.text_field_names
    if names is not None and not all(names):
        raise InputError(f"--text-fields {config.text_fields!r}: expected comma-separated column names")
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
