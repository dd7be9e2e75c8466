"""Loading CLIP: the shipped tiny CLIP, a local Hugging Face directory or a model id in the local HF cache.

The model is the engine's own (`perpeft.engine.clip.model`). An HF tokenizer is loaded with transformers on
its first call, not before: its identity (`ClipBundle.tokenizer_id`, the item-input cache's key) is the
hash of its files, so a run whose item inputs are cached never imports transformers.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perpeft.engine.clip.model import ClipConfig, ClipModel, load_clip_model
from perpeft.engine.clip.preprocess import Tokenizer
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD, TINY_CLIP_DIR, HashWordTokenizer, tiny_clip_config
from perpeft.engine.errors import InputError


@dataclass
class ClipBundle:
    """A loaded CLIP with what it needs to turn titles and images into inputs."""

    model: ClipModel
    tokenizer: Tokenizer
    tokenizer_id: str
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    source: str


def architecture_config(name: str) -> ClipConfig:
    """Built-in architecture aliases (no weights): ``vit-b-32`` is ``openai/clip-vit-base-patch32``."""
    if name == "vit-b-32":
        return ClipConfig()
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
    model = load_clip_model(path)
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
        tokenizer, tokenizer_id = _hf_tokenizer(path, model.config.text_config.max_position_embeddings)
    return ClipBundle(model, tokenizer, tokenizer_id, model.config.vision_config.image_size, mean, std, source)


HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def _hf_tokenizer(path: Path, max_length: int) -> tuple[Tokenizer, str]:
    """The directory's HF tokenizer, loaded on its first call, and its identity: the hash of its files."""
    files = [path / name for name in HF_TOKENIZER_FILES if (path / name).is_file()]
    if not any(file.name in ("tokenizer.json", "vocab.json") for file in files):
        raise InputError(f"{path}: no CLIP tokenizer (neither perpeft_tokenizer.json, tokenizer.json nor vocab.json)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        digest.update(file.read_bytes())
    loaded: list[Any] = []

    def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not loaded:
            loaded.append(_load_hf_tokenizer(path))
        encoded = loaded[0](texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    return tokenize, f"hf-tokenizer:{digest.hexdigest()[:16]}:{max_length}"


def _load_hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise InputError(f"{path}: cannot load the CLIP tokenizer ({type(error).__name__})") from None
