"""What a catalog update costs: `embed --add-items` of N items and a running service's pickup of it.

Copies RUN (a finished, embedded PerPEFT run) to a temporary directory, writes an item file of N new
items that copy the titles and images of the first N trained items, then times, in one process:
opening the run for serving (exact search; HNSW search building its graphs, then reading them back),
`add_items` (encode through every group's
adapters and the snapshot, write the addition and catalog.json) and `ServingRun.with_catalog` (what
the service does when it sees the new version):

    python benchmarks/catalog_update.py --run RUN --items 100 [--out catalog.json]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from perpeft.engine.data.sources import run_dataset
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.catalog import add_items, read_catalog
from perpeft.engine.serve.recommend import ServingRun


def write_item_copies(run: Path, directory: Path, rows: list[int], prefix: str = "added") -> tuple[Path, list[str]]:
    """An item file in ``directory`` (for `embed --add-items`) whose items copy the titles and images of
    the run's trained items ``rows`` under new ids ``prefix + row``; returns the file and the new ids."""
    dataset = run_dataset(RunDirectory.open(run).config)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines, ids = ["item_id:token\ttitle:token_seq"], []
    for row in rows:
        new_id = f"{prefix}{row}"
        image = dataset.image_paths[row]
        if image is not None:
            shutil.copy(image, directory / "images" / f"{new_id}{image.suffix}")
        lines.append(f"{new_id}\t{dataset.titles[row]}")
        ids.append(new_id)
    path = directory / f"{directory.name}.item"
    path.write_text("\n".join(lines) + "\n")
    return path, ids


def measure(run: Path, count: int) -> dict[str, float | int]:
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "run"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("additions", "catalog.json", "hnsw"))
        item_file, _ = write_item_copies(copy, Path(scratch) / "added", list(range(1, count + 1)))
        figures: dict[str, float | int] = {"items_added": count}
        servings = {}
        for kind in ("exact", "hnsw"):
            started = time.perf_counter()
            servings[kind] = ServingRun.open(copy, kind)
            figures[f"open_{kind}_s"] = time.perf_counter() - started
        started = time.perf_counter()
        ServingRun.open(copy, "hnsw")  # the graphs the first open built and kept, read back
        figures["open_hnsw_kept_graphs_s"] = time.perf_counter() - started
        started = time.perf_counter()
        add_items(copy, item_file, progress=False)
        figures["add_items_s"] = time.perf_counter() - started
        catalog = read_catalog(RunDirectory.open(copy))
        for kind, serving in servings.items():
            started = time.perf_counter()
            serving.with_catalog(catalog)
            figures[f"with_catalog_{kind}_s"] = time.perf_counter() - started
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished PerPEFT run with its embeddings")
    parser.add_argument("--items", type=int, default=100, help="how many items to add")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    figures = {"run": str(arguments.run), "threads": arguments.threads, **measure(arguments.run, arguments.items)}
    print(json.dumps(figures, indent=2))
    if arguments.out:
        arguments.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
