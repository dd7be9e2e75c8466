"""Frozen CLIP hidden states of every item, computed once per (catalog, CLIP) and memory-mapped: IISAN's input.

Per item and tower the cache holds ``n`` hidden states (HF's ``hidden_states``: the embeddings output and
each layer's output, before the final LayerNorm) at one token: vision CLS (position 0) and text EOS (the
token CLIP pools). ``n`` = 7 states evenly spaced from 0 to the last layer, i.e. 0, 2, …, 12 for ViT-B/32
as IISAN reads it; a tower with fewer than 6 layers keeps all ``L + 1`` (the tiny CLIP: 0, 1, 2), and both
towers use the smaller count.

The file is a standard safetensors file (``text`` ``[I+1, n, T]`` and ``image`` ``[I+1, n, V]`` float32,
row 0 padding), written row batch by row batch so building never holds the catalog in memory. Reading
maps its data region with numpy rather than ``safe_open``: a batch gathers scattered rows, which
``safe_open`` can only serve by loading whole tensors, while a memory map reads just those rows.

The directory name is the item-inputs cache's name (content key of titles, images, tokenizer, image
size) plus a hash of the CLIP's config and weights, the image normalisation and this format, so a
changed catalog or model builds a new cache and an unchanged one is never rebuilt.
"""

import hashlib
import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from perpeft.engine.clip.loading import ClipBundle
from perpeft.engine.clip.model import ClipConfig, ClipModel, eos_positions
from perpeft.engine.clip.preprocess import normalize_pixels
from perpeft.engine.features.inputs import ItemInputs
from perpeft.engine.runtime.atomic import atomic_write_bytes, temporary_directory_beside
from perpeft.engine.runtime.cache import cache_root, discard_damaged, publish_directory
from perpeft.engine.runtime.device import to_device

FORMAT = "iisan-hidden-v1"
STATES_FILE = "hidden.safetensors"
MAX_STATES = 7
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SAMPLES_PER_TENSOR = 64


def hidden_layer_indices(num_layers: int, count: int) -> list[int]:
    """``count`` of a tower's ``num_layers + 1`` hidden states, evenly spaced from 0 to ``num_layers``."""
    return [k * num_layers // (count - 1) for k in range(count)]


def iisan_state_count(config: ClipConfig) -> int:
    """Hidden states cached per tower: 7, or every state of the shallower tower when it has fewer."""
    depths = (config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers)
    return min(MAX_STATES, *(depth + 1 for depth in depths))


@dataclass
class HiddenStates:
    """Cached text (EOS) and vision (CLS) hidden states of every item, ``[I+1, n, d]``, memory-mapped."""

    text: np.ndarray
    image: np.ndarray
    path: Path

    @property
    def layers(self) -> int:
        return self.text.shape[1]

    @property
    def text_dim(self) -> int:
        return self.text.shape[2]

    @property
    def image_dim(self) -> int:
        return self.image.shape[2]

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text, image)`` states of ``items`` on ``device``: only these rows are read from disk."""
        index = items.cpu().numpy()
        text, image = (to_device(torch.from_numpy(array[index]), device) for array in (self.text, self.image))
        return text, image


def clip_fingerprint(model: ClipModel) -> str:
    """sha256 of a CLIP's config and weights.

    A model loaded from a directory is hashed once per version of its checkpoint files (resolved path,
    size, mtime) and of a sparse sample of its in-memory weights; the hash is memoised under the cache root.
    """
    files = _checkpoint_files(model)
    if not files:
        return _hash_model(model)
    identity = hashlib.sha256(_weight_sample(model))
    for path in files:
        stat = path.stat()
        identity.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    memo = cache_root() / "clip-fingerprints" / f"{identity.hexdigest()[:32]}.txt"
    if memo.is_file():
        remembered = memo.read_text(errors="replace")
        if re.fullmatch("[0-9a-f]{64}", remembered):
            return remembered  # else damaged: computed and written again
    fingerprint = _hash_model(model)
    atomic_write_bytes(memo, fingerprint.encode())
    return fingerprint


def load_hidden_states(
    bundle: ClipBundle, inputs: ItemInputs, device: torch.device, batch_size: int = 256, progress: bool = True
) -> HiddenStates:
    """Build the cache once per (item inputs, CLIP, preprocessing) and memory-map it on every later call."""
    key = json.dumps([FORMAT, clip_fingerprint(bundle.model), bundle.image_mean, bundle.image_std])
    directory = cache_root() / "hidden" / f"{inputs.directory.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    path = directory / STATES_FILE
    rows = inputs.input_ids.shape[0]
    if path.is_file():
        try:
            return _open_hidden_states(path, rows)
        except (OSError, ValueError, KeyError, struct.error) as error:
            discard_damaged(directory, str(error))
    _build_hidden_states(bundle, inputs, directory, device, batch_size, progress)
    return _open_hidden_states(path, rows)


def _open_hidden_states(path: Path, rows: int) -> HiddenStates:
    """The cache in ``path``, memory-mapped; an error when it is cut short or has other than ``rows`` rows."""
    arrays = _map_safetensors(path, "r")
    if any(arrays[name].shape[0] != rows for name in ("text", "image")):
        raise ValueError(f"{rows} rows expected, found {[array.shape for array in arrays.values()]}")
    return HiddenStates(arrays["text"], arrays["image"], path)


def _build_hidden_states(
    bundle: ClipBundle, inputs: ItemInputs, directory: Path, device: torch.device, batch_size: int, progress: bool
) -> None:
    model = bundle.model.eval()
    config = model.config
    text_config, vision_config = config.text_config, config.vision_config
    count = iisan_state_count(config)
    text_layers = hidden_layer_indices(text_config.num_hidden_layers, count)
    vision_layers = hidden_layer_indices(vision_config.num_hidden_layers, count)
    rows = inputs.input_ids.shape[0]
    shapes = {
        "text": (rows, count, text_config.hidden_size),
        "image": (rows, count, vision_config.hidden_size),
    }
    metadata = {"format": FORMAT, "text_layers": str(text_layers), "vision_layers": str(vision_layers)}
    mean = torch.tensor(bundle.image_mean, device=device)
    std = torch.tensor(bundle.image_std, device=device)
    home = next(model.parameters()).device
    staging = temporary_directory_beside(directory)
    try:
        arrays = _create_safetensors(staging / STATES_FILE, shapes, metadata)
        model.to(device)
        with tqdm(
            total=rows - 1, desc="Caching CLIP hidden states", unit="item", disable=not progress, leave=False
        ) as bar:
            for start in range(1, rows, batch_size):
                items = torch.arange(start, min(start + batch_size, rows))
                input_ids, attention_mask, pixels = inputs.batch(items, device)
                text, image = _encode(
                    model, input_ids, attention_mask, normalize_pixels(pixels, mean, std), text_layers, vision_layers
                )
                arrays["text"][start : start + len(items)] = text.cpu().numpy()
                arrays["image"][start : start + len(items)] = image.cpu().numpy()
                bar.update(len(items))
        for array in arrays.values():
            array.flush()
        del arrays
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model.to(home)
    publish_directory(staging, directory)


@torch.no_grad()
def _encode(
    model: ClipModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor,
    text_layers: list[int],
    vision_layers: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text EOS and vision CLS hidden states ``[B, n, d]`` at the given layers."""
    text = model.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    vision = model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    eos = eos_positions(input_ids, model.text_model.config.eos_token_id)
    return (
        torch.stack([text.hidden_states[layer][rows, eos] for layer in text_layers], dim=1),
        torch.stack([vision.hidden_states[layer][:, 0] for layer in vision_layers], dim=1),
    )


def _create_safetensors(
    path: Path, shapes: dict[str, tuple[int, int, int]], metadata: dict[str, str]
) -> dict[str, np.memmap]:
    """A zero-filled float32 safetensors file holding ``shapes``, its tensors mapped for writing."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8-byte alignment
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + offset)
    return _map_safetensors(path, "r+")


def _map_safetensors(path: Path, mode: Literal["r", "r+"]) -> dict[str, np.memmap]:
    """The float32 tensors of a safetensors file as numpy memory maps (nothing is read yet)."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    arrays = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        start = 8 + length + info["data_offsets"][0]
        arrays[name] = np.memmap(path, dtype=np.float32, mode=mode, offset=start, shape=tuple(info["shape"]))
    return arrays


def _checkpoint_files(model: ClipModel) -> list[Path]:
    """Config and weight files of the directory the model was loaded from (none for an in-memory model)."""
    directory = model.source
    if directory is None or not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES)


def _config_json(model: ClipModel) -> str:
    return json.dumps(model.config.to_dict(), sort_keys=True)


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _hash_model(model: ClipModel) -> str:
    digest = hashlib.sha256(_config_json(model).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(_tensor_bytes(tensor).data)
    return digest.hexdigest()


def _weight_sample(model: ClipModel) -> bytes:
    """Config plus ~64 evenly strided values of every tensor: cheap, and catches weights changed in memory."""
    parts = [_config_json(model).encode()]
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        parts += [name.encode(), _tensor_bytes(flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)]).tobytes()]
    return b"\0".join(parts)
