"""CLIP's input preprocessing: the tokenizer interface, image resizing and pixel normalisation."""

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

Tokenizer = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def preprocess_image(image: Image.Image, size: int) -> np.ndarray:
    """CLIP's geometry: resize the shorter side to ``size`` (bicubic), center-crop, RGB uint8 ``[3, S, S]``."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    return np.asarray(cropped, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalize_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` → CLIP-normalised float; done on the device, after the (cheap) uint8 copy."""
    return (pixels.float().div_(255.0) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
