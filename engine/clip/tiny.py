"""A tiny CLIP for tests and the demo: an HF ``CLIPModel`` checkpoint, pretrained on demo-style pairs.

Both towers are CLIP's own architecture built from `tiny_clip_config`, so LoRA/(IA)3 injection,
hidden-state caching and EOS pooling behave as with ``openai/clip-vit-base-patch32``. Pretraining uses
transformers' ``CLIPModel`` (imported only there); the engine loads the result as any HF checkpoint. Text goes through
`HashWordTokenizer`, which accepts any UTF-8 string without a vocabulary file. The weights are
pretrained contrastively (CLIP's InfoNCE) on freshly rendered image–title pairs covering every
domain/aspect combination of the demo world (`perpeft.engine.data.demo`), and shipped in
``engine/assets/tiny_clip/`` (`TINY_CLIP_DIR`). The shipped files were produced by::

    pretrain_tiny_clip(TINY_CLIP_DIR, seed=0)  # steps=PRETRAIN_STEPS=1000, batch 256, 16,384 pairs

in 81 s of single-thread CPU (85–125 s wall on a shared 2-core box, transformers 5.24, torch 2.13);
the final batch loss was 0.132 and image→text top-1 retrieval among 512 held-out pairs
(``render_pairs(512, seed=1)``) reached 0.928 — chance is 0.002, and pairs that look identical but
differ in their title noun cap it at about 0.94.
"""

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from perpeft.engine.clip.model import ClipConfig, TextConfig, VisionConfig
from perpeft.engine.clip.preprocess import normalize_pixels, preprocess_image
from perpeft.engine.data.demo import ASPECT_VALUES, DOMAIN_NAMES, NOUNS, item_title, render_item
from perpeft.engine.runtime.atomic import replace_directory, temporary_directory_beside

log = logging.getLogger(__name__)

TINY_CLIP_DIR: Path = Path(__file__).parents[1] / "assets" / "tiny_clip"
TOKENIZER_FILE = "perpeft_tokenizer.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 32
PRETRAIN_STEPS = 1000
_WORDS = re.compile(r"\w+")


class HashWordTokenizer:
    """Lower-cased ``\\w+`` words, each mapped to a bucket by a stable hash (blake2b), in CLIP's layout.

    Ids: pad 0, bos 1, eos 3, words in ``[4, vocab_size)``; id 2 is never produced, because HF's
    CLIPTextModel switches to legacy argmax pooling when ``eos_token_id == 2``.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 3
    first_word_id = 4

    def __init__(self, vocab_size: int = 2048, max_length: int = 16) -> None:
        if vocab_size <= self.first_word_id or max_length < 2:
            raise ValueError(f"need vocab_size > {self.first_word_id} and max_length >= 2")
        self.vocab_size = vocab_size
        self.max_length = max_length

    @staticmethod
    def tokens(text: str) -> list[str]:
        """The words of ``text`` as the tokenizer sees them (lower-cased, untruncated)."""
        return _WORDS.findall(text.lower())

    def word_id(self, word: str) -> int:
        """The id of one (lower-case) word; the same in every process and on every platform."""
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        return self.first_word_id + int.from_bytes(digest, "little") % (self.vocab_size - self.first_word_id)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``input_ids`` and ``attention_mask`` ``[N, max_length]``: bos, words (truncated), eos, pad."""
        input_ids = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(texts), self.max_length), dtype=np.int64)
        for row, text in enumerate(texts):
            words = self.tokens(text)[: self.max_length - 2]
            ids = [self.bos_token_id, *(self.word_id(word) for word in words), self.eos_token_id]
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def to_json(self) -> str:
        """The contents of a ``perpeft_tokenizer.json`` file."""
        return json.dumps(
            {
                "type": "hash-words",
                "vocab_size": self.vocab_size,
                "max_length": self.max_length,
                "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "first_word_id": self.first_word_id,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> "HashWordTokenizer":
        """Read what `to_json` wrote; refuse other tokenizer types and other special ids."""
        data = json.loads(text)
        if data.get("type") != "hash-words":
            raise ValueError(f"not a hash-words tokenizer: type {data.get('type')!r}")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "first_word_id"):
            if data.get(key) != getattr(cls, key):
                raise ValueError(f"unsupported {key} {data.get(key)!r}, expected {getattr(cls, key)}")
        return cls(vocab_size=data["vocab_size"], max_length=data["max_length"])


def tiny_clip_config(tokenizer: HashWordTokenizer | None = None) -> ClipConfig:
    """A CLIP small enough to train inside CPU tests: 32 px images, 8 px patches, 2×64-d layers per tower."""
    tokenizer = tokenizer or HashWordTokenizer()
    tower: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    text = TextConfig(
        **tower,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=tokenizer.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = VisionConfig(**tower, image_size=IMAGE_SIZE, patch_size=8)
    return ClipConfig(text, vision, projection_dim=32)


def hf_clip(config: ClipConfig) -> Any:
    """A freshly initialised transformers ``CLIPModel`` of ``config`` (HF's initialisation)."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig.from_dict(config.to_dict()))


def render_pairs(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` fresh demo-style pairs: uint8 pixels ``[n, 3, 32, 32]`` and titles.

    Each pair draws one or two domains (any two) and every aspect value uniformly from the full
    palettes, so the pairs span all combinations rather than one demo catalog.
    """
    rng = np.random.default_rng([seed, 7])
    pixels = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    titles = []
    for k in range(n):
        count = 2 if rng.random() < 0.4 else 1
        domains = [DOMAIN_NAMES[d] for d in sorted(rng.choice(len(DOMAIN_NAMES), count, replace=False))]
        values = {name: str(rng.choice(choices)) for name, choices in ASPECT_VALUES.items()}
        pixels[k] = preprocess_image(render_item(domains, values, rng), IMAGE_SIZE)
        titles.append(item_title(domains, values, str(rng.choice(NOUNS))))
    return pixels, titles


@torch.no_grad()
def image_to_text_accuracy(model: Any, tokenizer: HashWordTokenizer, pixels: np.ndarray, titles: list[str]) -> float:
    """Top-1 image→text retrieval accuracy of ``model`` (a transformers ``CLIPModel``) among the given pairs."""
    input_ids, attention_mask = tokenizer(titles)
    out = model(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        pixel_values=_normalize(torch.from_numpy(pixels)),
    )
    hits = out.logits_per_image.argmax(dim=1) == torch.arange(len(titles))
    return hits.float().mean().item()


def pretrain_tiny_clip(out_dir: Path, seed: int = 0, steps: int = PRETRAIN_STEPS, progress: bool = True) -> Path:
    """Pretrain the tiny CLIP contrastively and write it (atomically) as a loadable model folder.

    Deterministic for a given seed and step count: fixed seeds, one intra-op thread while training.
    Writes ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` and ``perpeft_tokenizer.json``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out_dir = Path(out_dir)
    batch_size, pool_size, lr = 256, 16384, 2e-3
    tokenizer = HashWordTokenizer()
    pixels, titles = render_pairs(min(pool_size, steps * batch_size), seed)
    input_ids, attention_mask = (torch.from_numpy(a) for a in tokenizer(titles))
    pixels_t = torch.from_numpy(pixels)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = hf_clip(tiny_clip_config(tokenizer))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        warmup = max(1, steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step / steps, 1.0))),
        )
        order = torch.Generator().manual_seed(seed)
        model.train()
        for _ in tqdm(range(steps), desc="pretrain tiny CLIP", disable=not progress):
            batch = torch.randint(len(titles), (batch_size,), generator=order)
            loss = model(
                input_ids=input_ids[batch],
                attention_mask=attention_mask[batch],
                pixel_values=_normalize(pixels_t[batch]),
                return_loss=True,
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        accuracy = image_to_text_accuracy(model, tokenizer, *render_pairs(512, seed + 1))
    finally:
        torch.set_num_threads(threads)
    log.info("tiny CLIP: %d steps, final loss %.3f, held-out image→text accuracy %.3f", steps, loss.item(), accuracy)

    tmp = temporary_directory_beside(out_dir)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        preprocessor = {"crop_size": IMAGE_SIZE, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1) + "\n")
        (tmp / TOKENIZER_FILE).write_text(tokenizer.to_json() + "\n")
        replace_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    return normalize_pixels(pixels, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
