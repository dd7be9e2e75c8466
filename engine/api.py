"""The public Python API, re-exported by ``import perpeft``: everything else is private and may change.

A notebook's whole path::

    import perpeft

    data = perpeft.demo_dataset("data/shop")                      # or a RecBole directory, an authors' release
    config = perpeft.RunConfig(data=str(data), groups=4, epochs_global=2, epochs_perpeft=2)
    run = perpeft.train(config, "runs/shop")                      # Global PEFT → grouping → PerPEFT
    run.metrics["perpeft"]["test"]                                 # {"HR@10": …, "NDCG@10": …, …}
    assignment, centroids = run.grouping()
    tables = run.embed().items                                    # [C, I+1, d]; later run.embeddings()
    run.recommend(user="u12", k=10).items
    run.recommend(history=["i3", "i7"], k=10)                     # a new user: nearest group

The command line (``perpeft-engine``) is a thin layer over these functions. Progress goes to the
``perpeft`` logger (one line per epoch and stage) and to ``on_line`` when given; ``progress=True`` adds
tqdm bars (notebook-aware).
"""

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perpeft.engine.config.choices import DEFAULT_K
from perpeft.engine.config.run_config import DEMO_DEFAULTS, PAPER_DEFAULTS, RunConfig
from perpeft.engine.data.demo import DemoSpec, generate_demo
from perpeft.engine.experiments.grid import build_grid
from perpeft.engine.experiments.runner import RESULTS_CSV, run_experiment
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.catalog import Catalog
from perpeft.engine.serve.catalog import add_items as add_catalog_items
from perpeft.engine.serve.embed import Embeddings, embed_run, load_embeddings
from perpeft.engine.serve.export import export_adapter
from perpeft.engine.serve.recommend import Recommendations, evaluate_run
from perpeft.engine.serve.recommend import recommend as recommend_items
from perpeft.engine.train.pipeline import resume_run, train_new_run
from perpeft.engine.train.reseed import reseeded_config

__all__ = [
    "DEMO_DEFAULTS",
    "PAPER_DEFAULTS",
    "Catalog",
    "DemoSpec",
    "Embeddings",
    "Recommendations",
    "Run",
    "RunConfig",
    "demo_dataset",
    "experiment",
    "open_run",
    "reseed",
    "resume",
    "train",
]

log = logging.getLogger("perpeft")
OnLine = Callable[[str], None]


def _reporter(on_line: OnLine | None) -> OnLine:
    def report(line: str) -> None:
        log.info(line)
        if on_line is not None:
            on_line(line)

    return report


def demo_dataset(out: str | Path, seed: int = 0, spec: DemoSpec | None = None) -> Path:
    """Generate the synthetic demo shop (item images and titles, users' purchase sequences; ``spec`` sets its
    size) in ``out`` as a RecBole directory any `RunConfig` can name; returns its path."""
    return generate_demo(Path(out), seed=seed, spec=spec or DemoSpec())


@dataclass(frozen=True)
class Run:
    """A finished (or resumable) run directory: its configuration, metrics, grouping and tables."""

    path: Path

    @property
    def config(self) -> RunConfig:
        """The run's resolved configuration (``config.json``)."""
        return RunDirectory.open(self.path).config

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: per stage, the best epoch's validation and test HR/NDCG@K and the epoch records."""
        return RunDirectory.open(self.path).read_metrics()

    def grouping(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The user → group assignment (int64 ``[U+1]``, entry 0 unused) and the groups' centroids ``[C, d]``."""
        return RunDirectory.open(self.path).read_grouping()

    def embed(
        self, batch_size: int | None = None, overwrite: bool = False, device: str | None = None, progress: bool = False
    ) -> Embeddings:
        """Compute and cache in the run directory every group's item table and every user's vector
        (``batch_size`` (item, group) pairs per pass; resumable by chunk; existing embeddings are refused
        unless ``overwrite``, items added since kept)."""
        return embed_run(self.path, batch_size, overwrite, device, progress)

    def embeddings(self) -> Embeddings:
        """The cached tables `embed` wrote: ``items`` ``[C, I+1, d]``, ``users`` ``[U+1, d]``, ``groups``,
        ``centroids`` and the Global-PEFT ``snapshot`` table."""
        return load_embeddings(RunDirectory.open(self.path))

    def add_items(
        self, items: str | Path, batch_size: int | None = None, device: str | None = None, progress: bool = False
    ) -> tuple[Catalog, int]:
        """Encode an item file's new items (RecBole ``.item``, images beside it) through every group and
        publish them as the catalog's next version, which `recommend` and a running service read; returns
        the catalog and how many items this call added."""
        return add_catalog_items(self.path, Path(items), batch_size, device, progress)

    def recommend(
        self,
        user: str | None = None,
        history: Sequence[str] | None = None,
        k: int = DEFAULT_K,
        exclude: Sequence[str] = (),
    ) -> Recommendations:
        """Top-``k`` items for a known ``user`` or for a new user's ``history`` (item ids, oldest first), the
        user's items and ``exclude`` left out. Needs `embed` first."""
        if (user is None) == (history is None):
            raise ValueError("give exactly one of user and history")
        return recommend_items(
            self.path, k, user=user, history=None if history is None else list(history), exclude=exclude
        )

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Validation and test metrics recomputed from the embeddings (full ranking)."""
        return evaluate_run(self.path)

    def export_adapter(self, group: int, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
        """Write group ``group``'s adapter as a Hugging Face peft directory; returns its peft configuration."""
        return export_adapter(self.path, group, Path(out), overwrite)


def open_run(path: str | Path) -> Run:
    """A run directory written by `train` (checked: it must hold a run configuration)."""
    RunDirectory.open(Path(path))
    return Run(Path(path))


def train(
    config: RunConfig,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_line: OnLine | None = None,
    log_dir: str | Path | None = None,
) -> Run:
    """Train ``config``'s method end to end into ``out`` (default ``runs/<data>-[<method>-]<peft>-seed<N>``);
    an existing run there is refused unless ``overwrite`` (`resume` continues an interrupted one).
    ``log_dir`` also logs every epoch to TensorBoard."""
    path = Path(out) if out is not None else RunDirectory.default_path(config)
    run, _ = train_new_run(config, path, overwrite, _reporter(on_line), progress, log_dir=_path(log_dir))
    return Run(run.path)


def reseed(
    source: Run,
    seed: int,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_line: OnLine | None = None,
    log_dir: str | Path | None = None,
    **machine: str,
) -> Run:
    """Train ``source``'s second stage again with ``seed``, reusing its Global stage and groups (the
    paper's seed-to-seed divergence); ``machine`` may set ``device``, ``precision`` and ``compile``. Default ``out``: ``<source>-reseed-<seed>``."""
    source_run = RunDirectory.open(source.path)
    config = reseeded_config(source_run, seed, **machine)
    path = Path(out) if out is not None else source_run.reseed_path(config.seed)
    run, _ = train_new_run(
        config, path, overwrite, _reporter(on_line), progress, global_from=source_run, log_dir=_path(log_dir)
    )
    return Run(run.path)


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def resume(
    path: str | Path, *, progress: bool = True, on_line: OnLine | None = None, log_dir: str | Path | None = None
) -> Run:
    """Continue an interrupted run where it stopped (a finished one is returned as it is)."""
    run, _ = resume_run(Path(path), _reporter(on_line), progress=progress, log_dir=_path(log_dir))
    return Run(run.path)


def experiment(
    config: RunConfig,
    out: str | Path,
    *,
    pefts: Sequence[str] = ("lora",),
    methods: Sequence[str] = ("perpeft",),
    seeds: Sequence[int] = (0,),
    ablations: bool = False,
    clusterings: Sequence[str] = (),
    group_counts: Sequence[int] = (),
    scalability: bool = False,
    divergence: bool = False,
    tuning: dict[str, list[Any]] | None = None,
    on_line: OnLine | None = None,
) -> list[dict[str, str]]:
    """Run (or resume) a grid of cells × seeds on ``config``'s data and settings, write ``results.csv`` and
    ``table.md`` under ``out``, and return ``results.csv``'s rows (one per run). ``tuning`` maps schedule
    settings (``lr``, ``weight_decay``, …) to the values to try: every cell trains each combination and is
    reported at the one its validation metric selects."""
    cells = build_grid(
        list(pefts), list(methods), ablations, list(clusterings), list(group_counts), scalability, divergence
    )
    run_experiment(config, cells, list(seeds), Path(out), _reporter(on_line), tuning)
    with (Path(out) / RESULTS_CSV).open(newline="") as table:
        return list(csv.DictReader(table))
