"""Shared fixtures: a small random-weight CLIP and its bundle."""

from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from perpeft.engine.clip.loading import ClipBundle
from perpeft.engine.clip.model import ClipConfig, ClipModel, clip_from_state
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD


def engine_clip(model: CLIPModel) -> ClipModel:
    """The engine's CLIP holding a copy of a transformers ``CLIPModel``'s weights (HF's random initialisation)."""
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return clip_from_state(ClipConfig.from_dict(model.config.to_dict()), state)


@pytest.fixture(scope="session")
def to_engine_clip() -> Callable[[CLIPModel], ClipModel]:
    """`engine_clip`, for tests that build their own transformers CLIP."""
    return engine_clip


def small_clip_config() -> CLIPConfig:
    text = {
        "vocab_size": 99,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 12,
        "eos_token_id": 98,
        "bos_token_id": 1,
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 16,
        "patch_size": 8,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)


def small_tokenizer(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(texts), 12), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        words = [2 + (sum(map(ord, word)) % 90) for word in text.split()][:10]
        tokens = [1, *words, 98]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


@pytest.fixture
def small_hf_clip() -> CLIPModel:
    """A small random transformers CLIP (the reference: `small_bundle` holds its weights)."""
    torch.manual_seed(0)
    return CLIPModel(small_clip_config()).eval()


@pytest.fixture
def small_bundle(small_hf_clip: CLIPModel) -> ClipBundle:
    model = engine_clip(small_hf_clip).eval()
    return ClipBundle(model, small_tokenizer, "small-test", 16, CLIP_MEAN, CLIP_STD, "small-test")
