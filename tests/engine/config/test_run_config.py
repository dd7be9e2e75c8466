"""RunConfig: presets fill unset values, every setting a method cannot honour is refused in one line."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from perpeft.engine.config.choices import COMPILE, PEFT, TRAIN_WINDOWS
from perpeft.engine.config.methods import METHODS
from perpeft.engine.config.run_config import DEMO_DEFAULTS, PAPER_DEFAULTS, ResolvedConfig, RunConfig
from perpeft.engine.errors import InputError


def test_presets_fill_only_unset_values() -> None:
    demo = RunConfig(lr=5e-4).resolved()
    assert (demo.epochs_global, demo.epochs_perpeft, demo.clip) == (
        DEMO_DEFAULTS["epochs_global"],
        DEMO_DEFAULTS["epochs_perpeft"],
        "tiny",
    )
    assert demo.lr == 5e-4
    real = RunConfig(data="/data/arts", clip="/clip").resolved()
    assert (real.epochs_global, real.lr) == (PAPER_DEFAULTS["epochs_global"], PAPER_DEFAULTS["lr"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": "/data/arts"}, "--clip is required"),
        ({"compile": "maybe"}, "--compile maybe"),
        ({"method": "magic"}, "--method magic: expected one of wo-mm, frozen-mm"),
        ({"grouping": "alphabetical"}, "--grouping alphabetical"),
        ({"clustering": "dbscan"}, "--clustering dbscan"),
        ({"text": False, "image": False}, "leave no modality"),
        ({"method": "wo-mm", "image": False}, "wo-mm uses no modality"),
        ({"peft": "iisan", "text": False}, "IISAN's inter-modal chain"),
        ({"method": "global-peft", "global_seed": 1}, "has a single stage"),
        ({"method": "large-global-peft", "peft": "ia3"}, "sizes LoRA's rank"),
        ({"groups": 0}, "must be positive"),
        ({"train_windows": "some"}, "--train-windows some: expected one of last, all, prefix"),
        ({"id_lr": 0.0}, "--id-lr 0.0: must be positive"),
        ({"text_fields": "title,,class"}, "--text-fields 'title,,class'"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_setting_that_cannot_run_is_refused(changes: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        RunConfig(**changes).resolved()


def test_config_json_round_trips_and_unknown_keys_are_named(tmp_path: Path) -> None:
    config = RunConfig(seed=5, groups=4).resolved()
    (tmp_path / "config.json").write_text(config.to_json())
    assert ResolvedConfig.from_json_file(tmp_path / "config.json") == config
    (tmp_path / "bad.json").write_text(json.dumps({**json.loads(config.to_json()), "colour": "red"}))
    with pytest.raises(InputError, match=r"bad.json: unknown configuration keys \['colour'\]"):
        RunConfig.from_json_file(tmp_path / "bad.json")


def test_the_grouping_seed_is_the_global_seed_when_one_is_set() -> None:
    plain, reseeded = RunConfig(seed=2), RunConfig(seed=2, global_seed=0)
    assert [plain.stage_seed(stage) for stage in ("global", "grouping", "perpeft")] == [2, 2, 2]
    assert [reseeded.stage_seed(stage) for stage in ("global", "grouping", "perpeft")] == [0, 0, 2]


def test_item_id_methods_need_no_clip() -> None:
    assert RunConfig(data="/data/ml-100k", method="wo-mm").resolved().clip is None


def catalog(config: RunConfig, has_text: bool, has_images: bool) -> RunConfig:
    return config.for_catalog(has_text, has_images, "/data/shop")


def test_unset_modalities_follow_the_catalog_and_explicit_ones_stay() -> None:
    config = RunConfig(data="demo")
    assert (catalog(config, True, True).text, catalog(config, True, True).image) == (True, True)
    assert (catalog(config, True, False).text, catalog(config, True, False).image) == (True, False)
    assert (catalog(config, False, True).text, catalog(config, False, True).image) == (False, True)
    ablation = catalog(RunConfig(data="demo", image=False), True, True)
    assert (ablation.text, ablation.image) == (True, False)
    explicit = RunConfig(data="demo", text=True, image=True)
    assert catalog(explicit, True, True) == explicit  # a run's config.json resolves to itself


def test_item_id_methods_record_no_dropped_modality_on_any_catalog() -> None:
    resolved = catalog(RunConfig(data="demo", method="wo-mm"), True, False)
    assert (resolved.text, resolved.image) == (True, True)
    assert catalog(resolved, True, False) == resolved


@pytest.mark.parametrize(
    ("changes", "has_text", "has_images", "message"),
    [
        ({"image": True}, True, False, "/data/shop: the catalog has no images (no images/ directory): drop --image"),
        ({"text": True}, False, True, "/data/shop: the catalog has no item text: drop --text"),
        ({"text": False}, True, False, "the catalog has no images and --no-text drops the other modality"),
        ({"image": False}, False, True, "the catalog has no item text and --no-image drops the other modality"),
        ({}, False, False, "neither item text nor images: use --method wo-mm"),
        ({"peft": "iisan"}, True, False, "the catalog has no images: IISAN's inter-modal chain needs both"),
    ],
)
def test_a_modality_the_catalog_cannot_give_is_refused(
    changes: dict, has_text: bool, has_images: bool, message: str
) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        catalog(RunConfig(data="demo", **changes), has_text, has_images)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft": "x"}, "--peft x: expected one of lora, ia3, iisan"),
        ({"groups": "8"}, "--groups '8': expected int"),
        ({"groups": True}, "--groups True: expected int"),
        ({"lr": "1e-3"}, "--lr '1e-3': expected float or None"),
        ({"baseline": 1}, "--baseline 1: expected bool"),
        ({"clip": 3}, "--clip 3: expected str or None"),
        ({"hidden": 0}, "--hidden 0: must be positive"),
        ({"lr": 0.0}, "--lr 0.0: must be positive"),
        ({"dropout": 1.0}, r"--dropout 1.0: must be in \[0, 1\)"),
        ({"weight_decay": -1e-4}, "--weight-decay -0.0001: must be ≥ 0"),
    ],
)
def test_a_bad_value_is_refused_at_construction(changes: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        RunConfig(**changes)


def test_a_config_json_with_a_bad_value_names_the_file(tmp_path: Path) -> None:
    values = {**json.loads(RunConfig(seed=5).resolved().to_json()), "groups": "4"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(InputError, match=r"config.json: --groups '4': expected int"):
        RunConfig.from_json_file(tmp_path / "config.json")
    assert RunConfig(lr=1, lora_alpha=8).lr == 1  # an int where a float goes


def test_a_resolved_config_has_its_whole_schedule(tmp_path: Path) -> None:
    resolved = RunConfig(data="/data/arts", clip="/clip", lr=3e-4).resolved()
    assert isinstance(resolved, ResolvedConfig)
    assert (resolved.epochs_global, resolved.epochs_perpeft, resolved.lr, resolved.weight_decay) == (10, 20, 3e-4, 1e-4)
    with pytest.raises(InputError, match="--lr None: expected float"):
        dataclasses.replace(resolved, lr=None)
    values = json.loads(resolved.to_json())
    (tmp_path / "config.json").write_text(json.dumps({**values, "epochs_perpeft": None}))
    with pytest.raises(InputError, match=r"config.json: --epochs-perpeft None: expected int"):
        ResolvedConfig.from_json_file(tmp_path / "config.json")


def test_choices_are_literal_types_and_the_cli_offers_the_same_values() -> None:
    hints = typing.get_type_hints(RunConfig)
    for name, choice in (("peft", PEFT), ("train_windows", TRAIN_WINDOWS), ("compile", COMPILE)):
        assert typing.get_origin(hints[name]) is typing.Literal
        assert typing.get_args(hints[name]) == choice.values
    assert typing.get_args(hints["method"]) == tuple(METHODS)
