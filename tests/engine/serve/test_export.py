"""`export_adapter`: each group's adapter loads in HF peft and reproduces the engine's encoder for it."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPModel

from perpeft.engine.clip.loading import load_clip
from perpeft.engine.clip.preprocess import normalize_pixels
from perpeft.engine.clip.tiny import TINY_CLIP_DIR
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import clip_encoder_factory
from perpeft.engine.runtime.records import RunMetrics, StageSummary
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.tensors import save_tensors
from perpeft.engine.serve.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_adapter

GROUPS = 3
TITLES = ["golf red star bag", "camping blue tent", "fishing green rod", "red golf tee", "blue stove", "net"]
ITEM_GROUPS = torch.tensor([0, 1, 2, 2, 1, 0])


def finished_run(root: Path, peft: str) -> tuple[Path, PerpeftModel | None]:
    """A finished run's files without training: config, random PerPEFT weights (lora, ia3), metrics.json."""
    config = RunConfig(clip="tiny", peft=peft, groups=GROUPS).resolved()
    run = RunDirectory.create(root / peft, config, overwrite=False)
    model = None
    if peft in ("lora", "ia3"):
        model = PerpeftModel(config, clip_encoder_factory(config, load_clip("tiny")), None, 5, GROUPS).eval()
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for parameter in model.encoder.adapter_state().values():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
        save_tensors(run.best("perpeft"), model.trainable_state())
    run.write_metrics(
        RunMetrics("shop", "perpeft", peft, GROUPS, 0, None, "perpeft", {"perpeft": StageSummary(1, 1, {}, {})})
    )
    return run.path, model


@pytest.fixture(scope="module")
def items() -> tuple[torch.Tensor, ...]:
    input_ids, attention_mask = load_clip("tiny").tokenizer(TITLES)
    pixels = torch.randint(0, 256, (len(TITLES), 3, 32, 32), generator=torch.Generator().manual_seed(5))
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask), pixels.to(torch.uint8)


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_exported_adapter_equals_engine_encoder(tmp_path, items, peft):
    path, model = finished_run(tmp_path, peft)
    clip = CLIPModel.from_pretrained(TINY_CLIP_DIR).eval()  # what peft loads the exported adapters into
    input_ids, attention_mask, pixels = items
    pixel_values = normalize_pixels(pixels, model.encoder.image_mean, model.encoder.image_std)
    with torch.no_grad():
        ours = model.encoder(
            input_ids, attention_mask, pixels, RowGroups.per_row(ITEM_GROUPS, GROUPS, torch.device("cpu"))
        )
        frozen = clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert not torch.allclose(ours, torch.cat([frozen.image_embeds, frozen.text_embeds], -1), atol=1e-3)

    for group in range(GROUPS):
        out = tmp_path / f"adapter-{group}"
        export_adapter(path, group, out)
        assert sorted(entry.name for entry in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        reference = PeftModel.from_pretrained(copy.deepcopy(clip), out).eval()
        exported = load_file(out / ADAPTER_WEIGHTS)
        loaded = get_peft_model_state_dict(reference)
        assert loaded.keys() == exported.keys() and len(exported) == (16 if peft == "lora" else 12)
        assert all(torch.equal(loaded[name], exported[name]) for name in exported)
        rows = ITEM_GROUPS.eq(group)
        with torch.no_grad():
            output = reference(
                input_ids=input_ids[rows], attention_mask=attention_mask[rows], pixel_values=pixel_values[rows]
            )
        torch.testing.assert_close(torch.cat([output.image_embeds, output.text_embeds], -1), ours[rows])


def test_lora_config_is_the_runs(tmp_path):
    path, _ = finished_run(tmp_path, "lora")
    export_adapter(path, 1, tmp_path / "adapter")
    config = PeftModel.from_pretrained(CLIPModel.from_pretrained(TINY_CLIP_DIR), tmp_path / "adapter").peft_config[
        "default"
    ]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"


def test_refuses_runs_without_a_peft_equivalent(tmp_path):
    path, _ = finished_run(tmp_path, "iisan")
    with pytest.raises(InputError, match="IISAN is a side network"):
        export_adapter(path, 0, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_config_json_with_an_unknown_peft_is_refused_when_the_run_opens(tmp_path):
    """Validation names the file and every PEFT type, instead of failing deep inside the encoder."""
    path, _ = finished_run(tmp_path, "lora")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "peft": "prefix-tuning"}))
    with pytest.raises(InputError, match=r"config.json: --peft prefix-tuning: expected one of lora, ia3, iisan"):
        export_adapter(path, 0, tmp_path / "adapter")


def test_refuses_unknown_group_and_non_empty_out(tmp_path):
    path, _ = finished_run(tmp_path, "ia3")
    with pytest.raises(InputError, match=r"groups 0\.\.2"):
        export_adapter(path, GROUPS, tmp_path / "adapter")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="--overwrite"):
        export_adapter(path, 0, out)
    export_adapter(path, 0, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep" and (out / ADAPTER_WEIGHTS).is_file()
