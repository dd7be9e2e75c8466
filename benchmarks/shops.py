"""Synthetic shops and local CLIP directories for the speed benchmarks and the peer comparison.

A shop is written once in the authors' release format (``PREFIX_final.txt``, the two pickles,
``PREFIX_images/KEY.jpg``: what their research scripts read) and converted by the engine's own
``prepare authors`` into a dataset directory, so the engine and a peer train on the same files.

- `SHOP_900`: the job of the speed issue: 900 users, 360 items, 3 interest domains, titles of 17–35
  characters, 64-px images (~23 purchases per item).
- `ARTS_SCALE`: the paper's Arts size (24,511 users, 18,884 items, ~9.4 purchases per user as in its
  Table 1), Amazon-like titles of 40–150 characters, 224-px images.

`write_byte_clip` saves a ``CLIPModel`` built from a config with a byte-level BPE tokenizer that has no
merges (one token per character, 77 at most) and CLIP's image preprocessor settings, loadable by
``CLIPModel/CLIPProcessor.from_pretrained`` and by ``perpeft-engine --clip DIR``.
"""

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from perpeft.engine.data.authors import prepare_authors
from perpeft.engine.runtime.cache import cache_root

WORDS = [
    "acrylic",
    "paint",
    "brush",
    "canvas",
    "yarn",
    "wool",
    "needle",
    "thread",
    "fabric",
    "cotton",
    "quilt",
    "bead",
    "glue",
    "tape",
    "paper",
    "card",
    "ink",
    "pen",
    "marker",
    "pencil",
    "sketch",
    "pad",
    "clay",
    "mold",
    "stamp",
    "ribbon",
    "lace",
    "button",
    "zipper",
    "hoop",
    "frame",
    "easel",
    "kit",
    "set",
    "pack",
    "roll",
    "sheet",
    "tool",
    "cutter",
    "scissors",
    "knife",
    "ruler",
    "stencil",
    "spray",
    "gloss",
    "matte",
    "metallic",
    "pastel",
    "neon",
    "vintage",
    "floral",
    "striped",
    "dotted",
    "large",
    "small",
    "mini",
    "jumbo",
    "premium",
    "craft",
    "art",
    "studio",
    "hobby",
    "school",
]


def bench_root() -> Path:
    """Where benchmarks keep the shops and CLIPs they write once: ``$PERPEFT_BENCH_DIR``, else the engine
    cache's ``bench/``."""
    return Path(os.environ.get("PERPEFT_BENCH_DIR", cache_root() / "bench"))


@dataclass(frozen=True)
class ShopSpec:
    """Shape of a synthetic shop: users buy within one interest domain, popular items more often."""

    users: int
    items: int
    domains: int
    title_chars: tuple[int, int]
    image_size: int
    mean_purchases: float
    prefix: str = "arts"
    seed: int = 0


SHOP_900 = ShopSpec(users=900, items=360, domains=3, title_chars=(17, 35), image_size=64, mean_purchases=9.2)
ARTS_SCALE = ShopSpec(
    users=24_511, items=18_884, domains=40, title_chars=(40, 150), image_size=224, mean_purchases=9.4328
)


def _title(rng: np.random.Generator, domain_words: list[str], low: int, high: int) -> str:
    target = int(rng.integers(low, high + 1))
    words: list[str] = []
    while len(" ".join(words)) < target:
        pool = domain_words if rng.random() < 0.6 else WORDS
        words.append(str(rng.choice(pool)))
    return " ".join(words)[:target].strip()


def _image(rng: np.random.Generator, colour: np.ndarray, size: int) -> Image.Image:
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3)
    top, left = rng.integers(0, size // 2, size=2)
    pixels[top : top + size // 2, left : left + size // 2] = colour
    return Image.fromarray(pixels)


def write_authors_release(directory: Path, spec: ShopSpec) -> Path:
    """Write ``spec``'s shop in the authors' release format into ``directory`` (idempotent); return it."""
    done = directory / f"{spec.prefix}.complete"
    if done.is_file():
        return directory
    rng = np.random.default_rng(spec.seed)
    item_domain = rng.integers(0, spec.domains, size=spec.items)
    domain_words = [list(rng.choice(WORDS, size=6, replace=False)) for _ in range(spec.domains)]
    domain_colour = rng.integers(0, 256, size=(spec.domains, 3))
    keys = [f"B{index:09d}" for index in range(1, spec.items + 1)]
    images = directory / f"{spec.prefix}_images"
    images.mkdir(parents=True, exist_ok=True)
    titles = {}
    for index, key in enumerate(keys):
        domain = int(item_domain[index])
        titles[key] = _title(rng, domain_words[domain], *spec.title_chars)
        _image(rng, domain_colour[domain], spec.image_size).save(images / f"{key}.jpg", quality=90)
    popularity = 1.0 / np.arange(1, spec.items + 1) ** 0.6
    rng.shuffle(popularity)
    members = [np.flatnonzero(item_domain == domain) for domain in range(spec.domains)]
    weights = [popularity[items] / popularity[items].sum() for items in members]
    lines = []
    for user in range(1, spec.users + 1):
        domain = int(rng.integers(0, spec.domains))
        count = min(5 + int(rng.geometric(1.0 / (spec.mean_purchases - 4.0))) - 1, len(members[domain]))
        bought = rng.choice(members[domain], size=count, replace=False, p=weights[domain])
        lines.extend(f"{user} {item + 1}" for item in bought)
    (directory / f"{spec.prefix}_final.txt").write_text("\n".join(lines) + "\n")
    with open(directory / f"{spec.prefix}_item2id_final.pickle", "wb") as file:
        pickle.dump({index: key for index, key in enumerate(keys, start=1)}, file)
    with open(directory / f"{spec.prefix}_texts_final.pickle", "wb") as file:
        pickle.dump(titles, file)
    done.write_text(json.dumps(spec.__dict__, default=list))
    return directory


def write_shop(root: Path, spec: ShopSpec) -> Path:
    """The shop as an engine dataset directory ``root/NAME`` (via ``prepare authors`` from ``root/release``)."""
    release = write_authors_release(root / "release", spec)
    out = root / f"shop-{spec.users}u-{spec.items}i"
    if not (out / "stats.json").is_file():
        prepare_authors(release, spec.prefix, out, overwrite=True)
    return out


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes (byte-level BPE's base alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)]


def byte_level_tokenizer(directory: Path, max_length: int = 77) -> CLIPTokenizer:
    """CLIP's BPE tokenizer with the 256 byte symbols (and their end-of-word forms) and no merges."""
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({f"{symbol}</w>": len(symbols) + index for index, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=vocab, merges=[], model_max_length=max_length, bos_token="<|startoftext|>", eos_token="<|endoftext|>"
    )


def shop_clip_config(vocab_size: int, bos: int, eos: int) -> CLIPConfig:
    """The issue's local CLIP: 64-d, 2 layers per tower, 32-px images, patch 8, projection 512."""
    tower = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {
        **tower,
        "vocab_size": vocab_size,
        "max_position_embeddings": 77,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    return CLIPConfig(text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=512)


def write_byte_clip(directory: Path, config: CLIPConfig | None = None, seed: int = 0) -> Path:
    """Save a random-weight CLIP (``config``, default `shop_clip_config`) with the byte-level tokenizer.

    The text config's bos/eos/pad ids are set to the tokenizer's, so EOS pooling finds the EOS token."""
    if (directory / "model.safetensors").is_file():
        return directory
    tokenizer = byte_level_tokenizer(directory)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if config is None:
        config = shop_clip_config(len(tokenizer), bos, eos)
    else:
        config.text_config.update({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos})
    torch.manual_seed(seed)
    model = CLIPModel(config)
    size = config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def user_subset(dataset: Path, users: int, out: Path) -> Path:
    """A dataset directory with ``dataset``'s catalog (the same item file and images, so the same input
    cache) and the interactions of its first ``users`` users."""
    name = out.name
    if (out / f"{name}.inter").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    source = dataset.name
    (out / f"{name}.item").write_bytes((dataset / f"{source}.item").read_bytes())
    kept: list[str] = []
    seen: set[str] = set()
    with open(dataset / f"{source}.inter") as lines:
        kept.append(next(lines))
        for line in lines:
            user = line.split("\t", 1)[0]
            if user not in seen:
                if len(seen) == users:
                    continue
                seen.add(user)
            kept.append(line)
    (out / f"{name}.inter").write_text("".join(kept))
    if not (out / "images").exists():
        (out / "images").symlink_to((dataset / "images").resolve())
    return out
