"""`prepare amazon2023` on 1,000,000 synthetic gzip'ed reviews: wall time and peak memory.

The files are generated into a temporary directory: 200,000 users with log-normal activity and 60,000
items with Zipf-like popularity (so 5-core filtering has real work to do), review lines shaped like Amazon
Reviews 2023 (rating, title, text, images, asin, parent_asin, user_id, timestamp, …), 2% repeated
purchases, and metadata for every item. The images directory is empty: every item is a missing-image
item. ``--user-fraction 1`` keeps every user, the most work. The run happens in a subprocess so that
its peak RSS (``ru_maxrss``) is its own. Goal on 2 CPU cores: under 2 minutes and 2 GiB.

Run: ``pytest benchmarks/test_prepare_bench.py --benchmark-enable``.
"""

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REVIEWS, USERS, ITEMS = 1_000_000, 200_000, 60_000
GOAL_SECONDS, GOAL_BYTES = 120, 2 * 2**30

CHILD = """
import json, resource, sys, time
from pathlib import Path
from perpeft.engine.data.amazon import prepare_amazon2023
root = Path(sys.argv[1])
start = time.perf_counter()
stats = prepare_amazon2023(root / "reviews.jsonl.gz", root / "meta.jsonl.gz", root / "images", root / "out",
                           user_fraction=1.0, seed=0, overwrite=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "stats": stats}))
"""


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("amazon-bench")
    rng = np.random.default_rng(0)
    user_weights = rng.lognormal(0.0, 1.2, USERS)
    item_weights = 1.0 / (np.arange(ITEMS) + 20.0)
    users = rng.choice(USERS, REVIEWS, p=user_weights / user_weights.sum())
    items = rng.choice(ITEMS, REVIEWS, p=item_weights / item_weights.sum())
    repeat = np.flatnonzero(rng.random(REVIEWS) < 0.02)  # the previous line's purchase, again
    users[repeat], items[repeat] = users[repeat - 1], items[repeat - 1]
    stamps = 1_500_000_000_000 + rng.integers(0, 10**11, REVIEWS)
    text = "Works as described, would buy again. " * 4
    with gzip.open(root / "reviews.jsonl.gz", "wt", compresslevel=1) as stream:
        stream.writelines(
            f'{{"rating": 4.0, "title": "Good", "text": "{text}", "images": [], "asin": "B{i:09d}",'
            f' "parent_asin": "B{i:09d}", "user_id": "AG{u:026d}", "timestamp": {t},'
            f' "helpful_vote": 0, "verified_purchase": true}}\n'
            for u, i, t in zip(users.tolist(), items.tolist(), stamps.tolist(), strict=True)
        )
    with gzip.open(root / "meta.jsonl.gz", "wt", compresslevel=1) as stream:
        for i in range(ITEMS):
            images = [
                {"thumb": f"https://x/{i}_t.jpg", "large": f"https://x/{i}.jpg", "hi_res": None, "variant": "MAIN"}
            ]
            stream.write(json.dumps({"parent_asin": f"B{i:09d}", "title": f"Product {i}", "images": images}) + "\n")
    (root / "images").mkdir()
    return root


def run_prepare(root: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_prepare_one_million_reviews(benchmark, raw_files: Path) -> None:
    started = time.perf_counter()
    run = benchmark.pedantic(run_prepare, args=(raw_files,), rounds=1, iterations=1)
    stats = run["stats"]
    peak_bytes = run["peak_kib"] * 1024
    benchmark.extra_info.update(
        reviews=REVIEWS,
        wall_s_in_child=round(run["seconds"], 2),
        wall_s_with_startup=round(time.perf_counter() - started, 2),
        peak_rss_mib=round(peak_bytes / 2**20, 1),
        users=stats["users"],
        items=stats["items"],
        interactions=stats["interactions"],
        core_rounds=stats["core_rounds"],
        reviews_duplicate=stats["dropped"]["reviews_duplicate"],
        reviews_below_5_core=stats["dropped"]["reviews_below_5_core"],
    )
    print(json.dumps(benchmark.extra_info, indent=1))
    assert stats["reviews"]["lines"] == REVIEWS and stats["items_without_image"] == stats["items"] > 0
    assert run["seconds"] < GOAL_SECONDS and peak_bytes < GOAL_BYTES
