"""The built-in synthetic dataset: planted interest domains whose users follow different item aspects.

The world
---------
Items are drawn objects with three *aspects* — colour (object fill), pattern (background) and shape
(object outline) — that show both in the rendered image and as words of the title. Each item also
belongs to one or two *interest domains* ("golf", "camping", …): the domain words lead the title and
the image carries a domain tag strip (one dark slot per domain) along its top edge. A fraction
``shared_fraction`` of the items (40% by default) belongs to two domains, like the paper's golf
travel bag that golfers and campers both buy for different reasons.

Each domain's users buy only items of their domain, and each domain *follows one aspect*: domain ``d``
follows ``aspects[d % len(aspects)]``. The two domains of a shared item always follow different
aspects, so the same item is "a red one" to one group and "a star" to the other. One shared CLIP
adapter must serve both readings at once; one adapter per group can specialise — the situation
PerPEFT is built for.

Why this world
--------------
The product owner's prototype (oracle aspect features instead of CLIP) tried both ways of planting
groups. Groups defined only by the aspect users follow were recovered poorly by K-Means on SASRec user
vectors and PerPEFT merely tied Global PEFT. Groups that are interest domains (disjoint purchase
sets, found by K-Means with purity 1.0), with 40% of items shared by two domains whose users follow
different aspects, gave PerPEFT a 20–25% NDCG@20 gain on every seed; without shared items the gain
fell to 2%, since then nothing is read in two ways. This module builds the second world.

How many users: 400 (50 per domain) by default, so the catalog's 400 items are bought ~8.6 times each,
as sparse as the paper's 5-core Amazon catalogs. With 1,600 users (~34 purchases per item) item-ID
embeddings alone learned the planted clusters from co-occurrence and beat every multimodal method but
PerPEFT, the reverse of the paper's Table 2 (results kept in ``benchmarks/results/*-1600users``); at
real-data sparsity content has to carry the items, and the paper's order w/o MM < Frozen MM < Global
PEFT < PerPEFT appears.

Behaviour model
---------------
A user's current interest is one value of their domain's aspect, and it evolves as a sticky Markov
chain: the first value is uniform; after each purchase the value stays with probability
``stay_prob`` and otherwise jumps to a uniformly chosen other value. Each purchase is, with
probability ``noise``, an off-interest item (uniform over the domain), else an item of the domain
whose followed aspect has the current value; no item is bought twice. A chain rather than a fixed
per-user taste keeps the task *sequential* (the most recent items predict the next best, as in the
paper's case study where the camper's "recent interest is camping food"), while a high ``stay_prob``
still makes a user's history a clear signal of what their group cares about. Within a domain the
values of its aspect are dealt evenly to its items, so every interest has candidates.

Output (RecBole atomic files; NAME = the directory's basename)
--------------------------------------------------------------
``NAME.inter`` (``user_id:token``, ``item_id:token``, ``timestamp:float``), ``NAME.item``
(``item_id:token``, ``title:token_seq``), ``images/ITEM_ID.png`` and ``planted.json`` (the truth:
user → domain, item → domains and aspect values, domain → aspect). Everything is a deterministic
function of the seed and the `DemoSpec`.
"""

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from perpeft.engine.runtime.atomic import replace_directory, temporary_directory_beside

DOMAIN_NAMES: tuple[str, ...] = ("golf", "camping", "fishing", "cycling", "yoga", "tennis", "hiking", "skiing")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 20),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "purple": (140, 45, 180),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "diagonal", "dotted", "checkered")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
NOUNS: tuple[str, ...] = ("bag", "kit", "set", "case", "pack", "box", "tool", "gear", "holder", "cover")
ASPECT_VALUES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "pattern": PATTERNS, "shape": SHAPES}

_CANVAS = 64  # drawing coordinates; scaled to the requested size
_TAG_HEIGHT = 12  # the domain tag strip along the top edge
_BACKGROUND = (240, 240, 240)
_PATTERN_INK = (175, 175, 175)
_TAG_INK = (30, 30, 30)
_OUTLINE = (45, 45, 45)
_BASE_TIME = 1_600_000_000
_DAY = 86_400


@dataclass(frozen=True)
class DemoSpec:
    """Size and behaviour of the demo world; the defaults fit a full CPU pipeline run in minutes.

    ``items_per_domain`` counts shared items in each of their domains, so the catalog has
    ``num_domains * items_per_domain / (1 + shared_fraction)`` items. ``aspects`` lists each aspect
    with the values the catalog uses (subsets of `ASPECT_VALUES`); ``stay_prob`` and ``noise`` drive
    the interest chain (module docstring); sequence lengths are uniform in
    ``[min_seq_len, max_seq_len]``; images are ``image_size`` pixels square.
    """

    num_domains: int = 8
    num_users: int = 400
    items_per_domain: int = 70
    shared_fraction: float = 0.4
    aspects: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("colour", tuple(COLOURS)),
        ("pattern", PATTERNS),
        ("shape", SHAPES),
    )
    stay_prob: float = 0.8
    noise: float = 0.1
    min_seq_len: int = 5
    max_seq_len: int = 12
    image_size: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.num_domains <= len(DOMAIN_NAMES):
            raise ValueError(f"num_domains must be in 1..{len(DOMAIN_NAMES)}, got {self.num_domains}")
        if not 0.0 <= self.shared_fraction < 1.0:
            raise ValueError(f"shared_fraction must be in [0, 1), got {self.shared_fraction}")
        if not self.aspects:
            raise ValueError("need at least one aspect")
        for name, values in self.aspects:
            if name not in ASPECT_VALUES or not values or not set(values) <= set(ASPECT_VALUES[name]):
                raise ValueError(f"aspect {name!r} with values {values} is not drawable")
        if self.shared_fraction > 0 and not self.shareable_pairs():
            raise ValueError("shared items need two domains that follow different aspects")
        if not (0.0 <= self.stay_prob <= 1.0 and 0.0 <= self.noise <= 1.0):
            raise ValueError("stay_prob and noise are probabilities")
        if not 1 <= self.min_seq_len <= self.max_seq_len:
            raise ValueError("need 1 <= min_seq_len <= max_seq_len")

    @property
    def domains(self) -> tuple[str, ...]:
        return DOMAIN_NAMES[: self.num_domains]

    def followed_aspect(self, domain: int) -> str:
        """The aspect whose value drives the purchases of ``domain``'s users."""
        return self.aspects[domain % len(self.aspects)][0]

    def shareable_pairs(self) -> list[tuple[int, int]]:
        """Domain pairs that may share items: those following different aspects."""
        return [
            (a, b)
            for a, b in combinations(range(self.num_domains), 2)
            if self.followed_aspect(a) != self.followed_aspect(b)
        ]


def item_title(domains: Sequence[str], values: Mapping[str, str], noun: str) -> str:
    """The title: domain words, then the aspect values in order, then a noun that the image does not show."""
    return " ".join(word.capitalize() for word in [*domains, *values.values(), noun])


def render_item(
    domains: Sequence[str], values: Mapping[str, str], rng: np.random.Generator, size: int = 64
) -> Image.Image:
    """Draw an item: domain tag strip on top, background ``pattern``, ``shape`` filled with ``colour``.

    Aspects missing from ``values`` take a neutral look (plain background, grey circle). ``rng`` jitters
    the object's position and size and the pattern's phase, so equal aspects do not mean equal pixels.
    """
    s = size / _CANVAS
    image = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for domain in domains:
        slot = DOMAIN_NAMES.index(domain)
        draw.rectangle([s * (8 * slot + 1), s * 2, s * (8 * slot + 7) - 1, s * 11 - 1], fill=_TAG_INK)
    _draw_pattern(draw, values.get("pattern", "plain"), int(rng.integers(0, 8)), s)
    cx = 32 + int(rng.integers(-3, 4))
    cy = 39 + int(rng.integers(-3, 4))
    radius = 14 + int(rng.integers(-2, 3))
    colour = COLOURS[values["colour"]] if "colour" in values else (128, 128, 128)
    points = _shape_points(values.get("shape", "circle"), cx, cy, radius)
    if points is None:
        box = [s * (cx - radius), s * (cy - radius), s * (cx + radius), s * (cy + radius)]
        draw.ellipse(box, fill=colour, outline=_OUTLINE)
    else:
        draw.polygon([(s * x, s * y) for x, y in points], fill=colour, outline=_OUTLINE)
    return image


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: str, phase: int, s: float) -> None:
    top, end = _TAG_HEIGHT, _CANVAS
    if pattern == "striped":
        for x in range(phase - 8, end, 8):
            draw.rectangle([s * x, s * top, s * (x + 3) - 1, s * end], fill=_PATTERN_INK)
    elif pattern == "diagonal":
        for x in range(phase - end, end, 10):
            draw.line([(s * x, s * top), (s * (x + end - top), s * end)], fill=_PATTERN_INK, width=round(3 * s))
    elif pattern == "dotted":
        for y in range(top + 2 + phase % 4, end, 8):
            for x in range(2 + phase, end, 8):
                draw.ellipse([s * (x - 2), s * (y - 2), s * (x + 2), s * (y + 2)], fill=_PATTERN_INK)
    elif pattern == "checkered":
        for row, y in enumerate(range(top, end, 8)):
            for col, x in enumerate(range(phase - 8, end, 8)):
                if (row + col) % 2:
                    draw.rectangle([s * x, s * y, s * (x + 8) - 1, s * (y + 8) - 1], fill=_PATTERN_INK)


def _shape_points(shape: str, cx: int, cy: int, r: int) -> list[tuple[float, float]] | None:
    """Polygon vertices of ``shape`` around (cx, cy); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + 1.2 * r * np.cos(a), cy + 1.2 * r * np.sin(a)) for a in angles]
    if shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.15 * r, 0.5 * r)
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles, strict=True)]
    w = 0.35 * r  # cross: half-width of the arms
    return [
        (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
        (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
        (cx - r, cy - w), (cx - w, cy - w),
    ]  # fmt: skip


@dataclass(frozen=True)
class _Item:
    domains: tuple[int, ...]
    values: dict[str, str]
    noun: str


def _plant_items(spec: DemoSpec, rng: np.random.Generator) -> list[_Item]:
    """Items with domains and aspect values; every domain gets ``items_per_domain`` items."""
    total = spec.num_domains * spec.items_per_domain
    num_shared = round(spec.shared_fraction * total / (1 + spec.shared_fraction))
    pairs = spec.shareable_pairs()
    pair_order: np.ndarray | list[int] = rng.permutation(len(pairs)) if pairs else []
    memberships: list[tuple[int, ...]] = [pairs[pair_order[k % len(pairs)]] for k in range(num_shared)]
    per_domain = np.bincount(np.array(memberships, dtype=int).reshape(-1), minlength=spec.num_domains)
    if (per_domain > spec.items_per_domain).any():
        raise ValueError("items_per_domain is too small for this shared_fraction")
    for domain in range(spec.num_domains):
        memberships += [(domain,)] * (spec.items_per_domain - int(per_domain[domain]))
    memberships = [memberships[k] for k in rng.permutation(len(memberships))]

    # Deal each domain's followed-aspect values like cards, so every value gets its share of the domain.
    decks: dict[int, list[str]] = {}
    items = []
    for domains in memberships:
        values = {name: str(rng.choice(choices)) for name, choices in spec.aspects}
        for domain in domains:
            aspect = spec.followed_aspect(domain)
            if not decks.get(domain):
                choices = dict(spec.aspects)[aspect]
                decks[domain] = [choices[k] for k in rng.permutation(len(choices))]
            values[aspect] = decks[domain].pop()
        items.append(_Item(domains, values, str(rng.choice(NOUNS))))
    return items


def _plant_sequences(spec: DemoSpec, items: list[_Item], rng: np.random.Generator) -> tuple[list[int], list]:
    """Each user's domain and purchase sequence (item indices), following the sticky interest chain."""
    domain_items = [[k for k, item in enumerate(items) if d in item.domains] for d in range(spec.num_domains)]
    user_domains = [int(d) for d in rng.permutation(np.arange(spec.num_users) % spec.num_domains)]
    sequences = []
    for domain in user_domains:
        aspect = spec.followed_aspect(domain)
        by_value: dict[str, list[int]] = {}
        for k in domain_items[domain]:
            by_value.setdefault(items[k].values[aspect], []).append(k)
        values = sorted(by_value)
        length = min(int(rng.integers(spec.min_seq_len, spec.max_seq_len + 1)), len(domain_items[domain]))
        current = values[int(rng.integers(len(values)))]
        bought: list[int] = []
        for _ in range(length):
            candidates = [k for k in by_value[current] if k not in bought]
            if rng.random() < spec.noise or not candidates:
                candidates = [k for k in domain_items[domain] if k not in bought]
            bought.append(candidates[int(rng.integers(len(candidates)))])
            if len(values) > 1 and rng.random() >= spec.stay_prob:
                others = [v for v in values if v != current]
                current = others[int(rng.integers(len(others)))]
        sequences.append(bought)
    return user_domains, sequences


def generate_demo(out_dir: Path, seed: int, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo dataset into ``out_dir`` (replacing it atomically) and return ``out_dir``."""
    out_dir = Path(out_dir)
    name = out_dir.name
    rng = np.random.default_rng([seed, 0])
    items = _plant_items(spec, rng)
    user_domains, sequences = _plant_sequences(spec, items, rng)
    item_ids = [f"i{k + 1:04d}" for k in range(len(items))]
    user_ids = [f"u{u + 1:05d}" for u in range(spec.num_users)]
    names = spec.domains

    tmp = temporary_directory_beside(out_dir)
    try:
        (tmp / "images").mkdir()
        item_lines = ["item_id:token\ttitle:token_seq"]
        for k, item in enumerate(items):
            domains = [names[d] for d in item.domains]
            item_lines.append(f"{item_ids[k]}\t{item_title(domains, item.values, item.noun)}")
            jitter = np.random.default_rng([seed, 1, k])
            render_item(domains, item.values, jitter, spec.image_size).save(tmp / "images" / f"{item_ids[k]}.png")
        (tmp / f"{name}.item").write_text("\n".join(item_lines) + "\n", encoding="utf-8")

        inter_lines = ["user_id:token\titem_id:token\ttimestamp:float"]
        for user, sequence in enumerate(sequences):
            time = _BASE_TIME + int(rng.integers(0, 365 * _DAY))
            for k in sequence:
                inter_lines.append(f"{user_ids[user]}\t{item_ids[k]}\t{time}")
                time += int(rng.integers(_DAY, 30 * _DAY))
        (tmp / f"{name}.inter").write_text("\n".join(inter_lines) + "\n", encoding="utf-8")

        planted = {
            "seed": seed,
            "spec": asdict(spec),
            "domain_aspect": {names[d]: spec.followed_aspect(d) for d in range(spec.num_domains)},
            "users": {user_ids[u]: names[d] for u, d in enumerate(user_domains)},
            "items": {
                item_ids[k]: {"domains": [names[d] for d in item.domains], **item.values}
                for k, item in enumerate(items)
            },
        }
        (tmp / "planted.json").write_text(json.dumps(planted, indent=1) + "\n", encoding="utf-8")
        replace_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
