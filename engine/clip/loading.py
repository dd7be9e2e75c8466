"""Loading CLIP: the shipped tiny CLIP, a local Hugging Face directory or a model id in the local HF cache."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from transformers.utils import logging as transformers_logging

from perpeft.engine.clip.preprocess import Tokenizer
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD, TINY_CLIP_DIR, HashWordTokenizer, tiny_clip_config
from perpeft.engine.errors import InputError


@dataclass
class ClipBundle:
    """A loaded CLIP with what it needs to turn titles and images into inputs."""

    model: CLIPModel
    tokenizer: Tokenizer
    tokenizer_id: str
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    source: str


def tower_configs(config: CLIPConfig) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """The text and vision configs of a CLIP config. `CLIPConfig` always builds both (from the dicts or the
    defaults it is given), though its fields are typed as what it accepts: a dict, a config or None."""
    text, vision = config.text_config, config.vision_config
    if not isinstance(text, CLIPTextConfig) or not isinstance(vision, CLIPVisionConfig):
        raise TypeError(
            f"a CLIPConfig whose text and vision configs are a {type(text).__name__} and a {type(vision).__name__}"
        )
    return text, vision


def projection_width(config: CLIPConfig) -> int:
    """The width of each tower's projected embedding (CLIPConfig types it as optional; it always has one)."""
    width = config.projection_dim
    if not isinstance(width, int):
        raise TypeError(f"a CLIPConfig whose projection_dim is {width!r}")
    return width


def architecture_config(name: str) -> CLIPConfig:
    """Built-in architecture aliases (no weights): ``vit-b-32`` is ``openai/clip-vit-base-patch32``."""
    if name == "vit-b-32":
        return CLIPConfig()
    if name == "tiny":
        return tiny_clip_config()
    raise InputError(f"--clip {name}: unknown architecture alias (known: vit-b-32, tiny)")


def load_clip(spec: str) -> ClipBundle:
    """``tiny`` (the shipped small CLIP), a local HF CLIP directory, or a model id in the local HF cache."""
    if spec == "tiny":
        return _load_directory(TINY_CLIP_DIR, "tiny")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, str(path.resolve()))
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(spec, local_files_only=True))
    except Exception as error:
        raise InputError(
            f"--clip {spec}: not 'tiny', not a local directory, and not found in the local HF cache "
            f"(no network is used) ({type(error).__name__})"
        ) from None
    return _load_directory(cached, spec)


def _load_directory(path: Path, source: str) -> ClipBundle:
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a CLIP checkpoint directory (no config.json)")
    transformers_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise InputError(f"{path}: cannot load a CLIPModel ({type(error).__name__}: {error})") from None
    if getattr(model, "use_kernels", False):
        # Transformers >= 5 turns on Hub kernels by default: layers swapped for kernels fetched from the
        # Hub on first use, again at every train()/eval() switch. The engine runs torch's layers and its own.
        model.use_kernels = False
    text_config, vision_config = tower_configs(model.config)
    image_size = vision_config.image_size
    if not isinstance(image_size, int):
        raise InputError(f"{path}: image_size {image_size!r}: only square images (one int) are supported")
    mean, std = CLIP_MEAN, CLIP_STD
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean = tuple(settings.get("image_mean", mean))
        std = tuple(settings.get("image_std", std))
    hashed = path / "perpeft_tokenizer.json"
    tokenizer: Tokenizer
    if hashed.is_file():
        tokenizer_id = hashed.read_text()
        try:
            tokenizer = HashWordTokenizer.from_json(tokenizer_id)
        except ValueError as error:
            raise InputError(f"{hashed}: {error}") from None
    else:
        tokenizer, tokenizer_id = _hf_tokenizer(path, text_config.max_position_embeddings)
    return ClipBundle(model, tokenizer, tokenizer_id, image_size, mean, std, source)


def _hf_tokenizer(path: Path, max_length: int) -> tuple[Tokenizer, str]:
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise InputError(f"{path}: cannot load the CLIP tokenizer ({type(error).__name__})") from None

    def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    return tokenize, f"{type(hf_tokenizer).__name__}:{len(hf_tokenizer)}:{max_length}:{path.name}"
