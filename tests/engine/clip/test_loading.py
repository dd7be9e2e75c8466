"""`load_clip` and `load_clip_model`: HF checkpoint directories in every weight layout, faults named by file,
and no transformers import while loading (it costs seconds; only an HF tokenizer's first call needs it)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perpeft.engine.clip.loading import load_clip
from perpeft.engine.clip.model import ClipConfig, TextConfig, VisionConfig, load_clip_model
from perpeft.engine.clip.tiny import TINY_CLIP_DIR
from perpeft.engine.errors import InputError


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A copy of the shipped tiny CLIP's directory."""
    return Path(shutil.copytree(TINY_CLIP_DIR, tmp_path / "clip"))


def same_weights(left: torch.nn.Module, right: torch.nn.Module) -> bool:
    a, b = left.state_dict(), right.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_loading_imports_no_transformers() -> None:
    code = (
        "import sys; import perpeft.engine.api; from perpeft.engine.clip.loading import load_clip; "
        "load_clip('tiny'); print('transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_sharded_and_pickled_weights_load_as_the_single_file(checkpoint: Path) -> None:
    single = load_clip_model(checkpoint)
    state = load_file(checkpoint / "model.safetensors")
    names = sorted(state)
    (checkpoint / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({name: state[name] for name in part}, checkpoint / file)
    weight_map = {name: file for file, part in shards.items() for name in part}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same_weights(load_clip_model(checkpoint), single)
    for file in [*shards, "model.safetensors.index.json"]:
        (checkpoint / file).unlink()
    torch.save(
        {**state, "text_model.embeddings.position_ids": torch.arange(16)[None]}, checkpoint / "pytorch_model.bin"
    )
    assert same_weights(load_clip_model(checkpoint), single)


def test_float16_weights_load_as_float32(checkpoint: Path) -> None:
    state = load_file(checkpoint / "model.safetensors")
    save_file({name: tensor.half() for name, tensor in state.items()}, checkpoint / "model.safetensors")
    model = load_clip_model(checkpoint)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def edit_config(checkpoint: Path, change: dict) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (checkpoint / "config.json").write_text(json.dumps(config))


def edit_weights(checkpoint: Path, change) -> None:
    state = load_file(checkpoint / "model.safetensors")
    change(state)
    save_file(state, checkpoint / "model.safetensors")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: (c / "config.json").unlink(), "no config.json"),
        (lambda c: (c / "config.json").write_text("{not json"), "config.json: not readable JSON"),
        (lambda c: (c / "config.json").write_text("[1, 2]"), "config.json: a JSON list"),
        (lambda c: edit_config(c, {"model_type": "siglip"}), "model_type 'siglip', not a CLIP"),
        (lambda c: edit_config(c, {"text_config": {"hidden_act": "swish"}}), "hidden_act 'swish'"),
        (lambda c: edit_config(c, {"vision_config": {"num_attention_heads": 5}}), "not a multiple"),
        (lambda c: (c / "model.safetensors").unlink(), "no CLIP weights"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 5), "model.safetensors: cannot read"),
        (lambda c: edit_weights(c, lambda s: s.pop("logit_scale")), "the weights lack logit_scale"),
        (lambda c: edit_weights(c, lambda s: s.update(extra=torch.zeros(1))), "have an unexpected extra"),
        (
            lambda c: edit_weights(c, lambda s: s.update({"text_projection.weight": torch.zeros(3, 3)})),
            "text_projection.weight has shape (3, 3), the config says (32, 64)",
        ),
        (
            lambda c: edit_weights(c, lambda s: s.update(logit_scale=torch.tensor(1))),
            "logit_scale is not a float tensor",
        ),
    ],
)
def test_faults_name_the_file(checkpoint: Path, damage, message: str) -> None:
    damage(checkpoint)
    with pytest.raises(InputError, match=str(checkpoint)) as raised:
        load_clip_model(checkpoint)
    assert message in str(raised.value)


def test_configs_refuse_bad_values_and_round_trip() -> None:
    config = ClipConfig(TextConfig(hidden_size=64, num_attention_heads=4), VisionConfig(image_size=64), 16)
    assert ClipConfig.from_dict(config.to_dict()) == config
    assert ClipConfig.from_dict({}) == ClipConfig()
    legacy = {"text_config": {"hidden_size": 64}, "text_config_dict": {"hidden_size": 128}}
    assert ClipConfig.from_dict(legacy).text_config.hidden_size == 128  # HF's precedence
    with pytest.raises(ValueError, match="eos_token_id"):
        TextConfig(eos_token_id=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=16, patch_size=32)
    with pytest.raises(ValueError, match="projection_dim"):
        ClipConfig(projection_dim=0)
    with pytest.raises(ValueError, match="attention_dropout"):
        VisionConfig(attention_dropout=1.0)


def test_hf_tokenizer_loads_on_first_call_keyed_by_its_files(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    checkpoint = Path(shutil.copytree(TINY_CLIP_DIR, tmp_path / "clip"))
    (checkpoint / "perpeft_tokenizer.json").unlink()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in ("g", "o", "l", "f", "b", "a", "golf</w>", "bag</w>"):
        vocab.setdefault(piece, len(vocab))
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(checkpoint)
    edit_config(checkpoint, {"text_config": {"vocab_size": 2048}})
    bundle = load_clip(str(checkpoint))
    expected = CLIPTokenizer.from_pretrained(checkpoint)(
        ["golf bag"], padding="max_length", truncation=True, max_length=16, return_tensors="np"
    )
    ids, mask = bundle.tokenizer(["golf bag"])
    assert ids.tolist() == expected["input_ids"].tolist() and mask.tolist() == expected["attention_mask"].tolist()
    assert bundle.tokenizer_id.endswith(":16")
    vocab["new</w>"] = len(vocab)
    (checkpoint / "vocab.json").write_text(json.dumps(vocab))
    assert load_clip(str(checkpoint)).tokenizer_id != bundle.tokenizer_id
    for name in ("vocab.json", "tokenizer.json"):
        (checkpoint / name).unlink(missing_ok=True)
    with pytest.raises(InputError, match="no CLIP tokenizer"):
        load_clip(str(checkpoint))
