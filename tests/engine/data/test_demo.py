import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perpeft.engine.data.demo import COLOURS, DOMAIN_NAMES, DemoSpec, generate_demo, item_title, render_item

SPEC = DemoSpec()


def _read(root: Path) -> tuple[dict, dict[str, list[str]], dict[str, str]]:
    planted = json.loads((root / "planted.json").read_text())
    sequences: dict[str, list[str]] = {}
    for line in (root / f"{root.name}.inter").read_text().splitlines()[1:]:
        user, item, _ = line.split("\t")
        sequences.setdefault(user, []).append(item)
    titles = dict(line.split("\t") for line in (root / f"{root.name}.item").read_text().splitlines()[1:])
    return planted, sequences, titles


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("a") / "demo", seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(demo: Path, tmp_path: Path) -> None:
    again = generate_demo(tmp_path / "demo", seed=0)
    assert _files(again) == _files(demo)
    other = generate_demo(tmp_path / "other", seed=1)
    assert (other / "other.inter").read_bytes() != (demo / "demo.inter").read_bytes()


def test_regenerating_replaces_the_directory_atomically(tmp_path: Path) -> None:
    spec = DemoSpec(num_users=40, items_per_domain=10)
    generate_demo(tmp_path / "d", seed=0, spec=spec)
    (tmp_path / "d" / "stale.txt").write_text("x")
    generate_demo(tmp_path / "d", seed=3, spec=spec)
    assert not (tmp_path / "d" / "stale.txt").exists()
    assert json.loads((tmp_path / "d" / "planted.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_recbole_files_and_sizes(demo: Path) -> None:
    inter = (demo / "demo.inter").read_text().splitlines()
    assert inter[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert (demo / "demo.item").read_text().splitlines()[0] == "item_id:token\ttitle:token_seq"
    planted, sequences, titles = _read(demo)
    num_items = round(SPEC.num_domains * SPEC.items_per_domain / (1 + SPEC.shared_fraction))
    assert len(titles) == len(planted["items"]) == num_items
    assert len(sequences) == len(planted["users"]) == SPEC.num_users
    assert all(SPEC.min_seq_len <= len(s) == len(set(s)) <= SPEC.max_seq_len for s in sequences.values())
    assert sorted(p.stem for p in (demo / "images").iterdir()) == sorted(titles)
    with Image.open(demo / "images" / f"{next(iter(titles))}.png") as image:
        assert image.size == (SPEC.image_size, SPEC.image_size)
    times = {}
    for line in inter[1:]:
        user, _, time = line.split("\t")
        assert float(time) > times.get(user, 0.0)
        times[user] = float(time)


def test_forty_percent_of_items_are_shared_by_domains_that_follow_different_aspects(demo: Path) -> None:
    planted, _, _ = _read(demo)
    items = planted["items"].values()
    shared = [item["domains"] for item in items if len(item["domains"]) == 2]
    assert len(shared) / len(items) == pytest.approx(SPEC.shared_fraction, abs=0.01)
    assert all(len(item["domains"]) in (1, 2) for item in items)
    assert all(planted["domain_aspect"][a] != planted["domain_aspect"][b] for a, b in shared)
    per_domain = Counter(d for item in items for d in item["domains"])
    assert per_domain == dict.fromkeys(DOMAIN_NAMES[: SPEC.num_domains], SPEC.items_per_domain)


def test_users_buy_only_items_of_their_domain_and_domains_are_balanced(demo: Path) -> None:
    planted, sequences, _ = _read(demo)
    for user, sequence in sequences.items():
        assert all(planted["users"][user] in planted["items"][i]["domains"] for i in sequence)
    assert set(Counter(planted["users"].values()).values()) == {SPEC.num_users // SPEC.num_domains}


def test_consecutive_purchases_share_the_domain_aspect_value_far_above_chance(demo: Path) -> None:
    planted, sequences, _ = _read(demo)
    aspects = [name for name, _ in SPEC.aspects]
    followed, other = Counter(), Counter()
    for user, sequence in sequences.items():
        aspect = planted["domain_aspect"][planted["users"][user]]
        for a, b in pairwise(sequence):
            for name in aspects:
                same = planted["items"][a][name] == planted["items"][b][name]
                (followed if name == aspect else other).update({"same": same, "all": 1})
    # Chance for a uniform value of 5-6 options is about 0.2; the chain stays with probability 0.8.
    assert followed["same"] / followed["all"] > 0.6
    assert other["same"] / other["all"] < 0.3


def test_titles_and_images_show_domains_and_aspects(demo: Path) -> None:
    planted, _, titles = _read(demo)
    for item_id, truth in list(planted["items"].items())[:60]:
        words = titles[item_id].lower().split()
        assert words[: len(truth["domains"])] == truth["domains"]
        assert {truth[name] for name, _ in SPEC.aspects} <= set(words)
        pixels = np.asarray(Image.open(demo / "images" / f"{item_id}.png").convert("RGB")).astype(int)
        saturated = pixels[(pixels.max(-1) - pixels.min(-1)) > 60]
        dominant = Counter(map(tuple, saturated)).most_common(1)[0][0]
        assert dominant == COLOURS[truth["colour"]]
        tags = [pixels[6, 8 * slot + 3].max() < 100 for slot in range(len(DOMAIN_NAMES))]
        assert [DOMAIN_NAMES[s] for s, dark in enumerate(tags) if dark] == truth["domains"]


def test_render_item_and_title_are_pure_functions_of_their_inputs() -> None:
    values = {"colour": "blue", "pattern": "striped", "shape": "star"}
    first = render_item(["golf", "camping"], values, np.random.default_rng(5))
    second = render_item(["golf", "camping"], values, np.random.default_rng(5))
    assert first.tobytes() == second.tobytes()
    assert render_item(["golf"], values, np.random.default_rng(5), size=32).size == (32, 32)
    assert item_title(["golf", "camping"], values, "bag") == "Golf Camping Blue Striped Star Bag"


def test_spec_rejects_worlds_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="different aspects"):
        DemoSpec(aspects=(("colour", ("red", "blue")),))
    with pytest.raises(ValueError, match="not drawable"):
        DemoSpec(aspects=(("colour", ("red",)), ("texture", ("rough",))))
