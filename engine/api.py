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
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from perpeft.engine.analysis import refuse_existing
from perpeft.engine.analysis.attention import TitleAttention, title_attention, write_attention_heatmap
from perpeft.engine.analysis.attention import divergence as attention_divergence
from perpeft.engine.analysis.case import CaseItem, CaseStudy, write_case_study_html
from perpeft.engine.analysis.case import case_study as user_case_study
from perpeft.engine.analysis.curves import write_curves
from perpeft.engine.config.choices import DEFAULT_K
from perpeft.engine.config.run_config import DEMO_DEFAULTS, PAPER_DEFAULTS, LoraSettings, ResolvedConfig, RunConfig
from perpeft.engine.data.amazon import prepare_amazon2023 as convert_amazon2023
from perpeft.engine.data.authors import default_output_name, release_prefix
from perpeft.engine.data.authors import prepare_authors as convert_authors_release
from perpeft.engine.data.demo import DemoSpec, generate_demo
from perpeft.engine.data.fetch import REPORT, FetchSettings, read_item_list
from perpeft.engine.data.fetch import fetch_images as fetch_item_images
from perpeft.engine.data.formats import MISSING_IMAGES
from perpeft.engine.data.frames import prepare_frames
from perpeft.engine.data.sources import STATS, default_data_dir
from perpeft.engine.errors import InputError
from perpeft.engine.experiments.grid import build_grid
from perpeft.engine.experiments.runner import RESULTS_CSV, run_experiment
from perpeft.engine.model.params import parameter_counts as count_parameters
from perpeft.engine.runtime.memory import reuse_freed_memory
from perpeft.engine.runtime.records import EpochRecord
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.catalog import Catalog
from perpeft.engine.serve.catalog import add_items as add_catalog_items
from perpeft.engine.serve.embed import Embeddings, embed_run, load_embeddings
from perpeft.engine.serve.export import export_adapter
from perpeft.engine.serve.recommend import Recommendations, ServingRun, evaluate_run
from perpeft.engine.serve.recommend import recommend as recommend_items
from perpeft.engine.train.pipeline import resume_run, train_new_run
from perpeft.engine.train.progress import Progress
from perpeft.engine.train.reseed import reseeded_config

if TYPE_CHECKING:
    import pandas

__all__ = [
    "DEMO_DEFAULTS",
    "PAPER_DEFAULTS",
    "CaseItem",
    "CaseStudy",
    "Catalog",
    "DemoSpec",
    "Embeddings",
    "EpochRecord",
    "LoraSettings",
    "Prepared",
    "Progress",
    "Recommendations",
    "ResolvedConfig",
    "Run",
    "RunConfig",
    "TitleAttention",
    "attention_map",
    "case_study",
    "dataset_from_frames",
    "demo_dataset",
    "divergence",
    "experiment",
    "fetch_images",
    "learning_curves",
    "open_run",
    "parameter_counts",
    "prepare_amazon2023",
    "prepare_authors",
    "reseed",
    "resume",
    "reuse_freed_memory",
    "serve",
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


def dataset_from_frames(
    interactions: "pandas.DataFrame",
    items: "pandas.DataFrame",
    out: str | Path,
    images: str | Path | None = None,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    text_cols: Sequence[str] = ("title",),
    skip_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write pandas tables as a dataset directory ``out`` any `RunConfig` can name (``data=str(path)``);
    returns its path. Needs the optional extra ``pandas``.

    ``interactions`` has a row per purchase (``user_col``, ``item_col``, a numeric ``time_col``), ``items`` a
    row per item (``item_col`` and the ``text_cols`` whose non-missing values, joined by ``". "``, are its
    title); ``images`` is a directory of ``ITEM_ID.jpg`` (items without one are kept without image). Ids are
    strings or integers. Rows are kept as they are (a repeated purchase stays; no deduplication or k-core);
    each user's items are ordered by time, equal times in row order; items no interaction names are left
    out (counted in ``stats.json``). Bad input (a missing column, a duplicate item id, an unknown item, a
    non-numeric time, an empty table) raises `InputError` naming the table, column and row. An existing
    ``out`` is refused unless ``overwrite``; the directory is written atomically.
    """
    text_columns = (text_cols,) if isinstance(text_cols, str) else tuple(text_cols)
    path = Path(out)
    prepare_frames(
        interactions,
        items,
        path,
        None if images is None else Path(images),
        user_col,
        item_col,
        time_col,
        text_columns,
        skip_bad_images,
        overwrite,
        progress,
    )
    return path


@dataclass(frozen=True)
class Prepared:
    """What `prepare_authors`, `prepare_amazon2023` or `fetch_images` wrote: ``path``, the dataset directory
    (name it as ``RunConfig(data=str(path))``) or the image directory, and ``stats``, the statistics also
    written to ``report`` (``stats.json``: the paper's Table 1 columns, missing modalities, drops by reason;
    ``fetch_report.json``: downloads and failures)."""

    path: Path
    stats: dict[str, Any]
    report: Path

    @property
    def missing_images(self) -> Path | None:
        """The list of the items without an image (one id a line, as `fetch_images` takes ``items``), or
        None when every item has one."""
        listed = self.path / MISSING_IMAGES
        return listed if listed.is_file() else None


def prepare_authors(
    src: str | Path,
    *,
    name: str | None = None,
    out: str | Path | None = None,
    skip_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Prepared:
    """Convert the authors' released files in ``src`` (``PREFIX_final.txt``, ``PREFIX_item2id_final.pickle``,
    ``PREFIX_texts_final.pickle``, ``PREFIX_images/``) into a dataset directory. ``name`` picks the release
    (arts, sports, toys, beauty or any file prefix; default the one in ``src``); ``out`` defaults to the
    named datasets' directory (``$PERPEFT_DATA``). Timestamps are line numbers, which keep the order."""
    source = Path(src)
    path = Path(out) if out is not None else default_data_dir() / default_output_name(release_prefix(source, name))
    stats = convert_authors_release(source, name, path, skip_bad_images, overwrite, progress)
    return Prepared(path, stats, path / STATS)


def prepare_amazon2023(
    reviews: str | Path,
    meta: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    user_fraction: float = 0.4,
    seed: int = 0,
    skip_bad_lines: bool = False,
    skip_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Prepared:
    """Pre-process one raw Amazon Reviews 2023 domain into the dataset directory ``out`` as the paper's
    App. B.2 does: a seeded ``user_fraction`` of the users, one purchase per (user, item), 5-core, time
    order. ``reviews`` and ``meta`` are JSONL files (gzip'ed or not), ``images`` the directory of
    ``PARENT_ASIN.jpg`` that `fetch_images` fills. Malformed lines and unreadable images are errors unless
    ``skip_bad_lines`` / ``skip_bad_images`` skip and count them."""
    path = Path(out)
    stats = convert_amazon2023(
        Path(reviews),
        Path(meta),
        Path(images),
        path,
        user_fraction,
        seed,
        skip_bad_lines,
        skip_bad_images,
        overwrite,
        progress,
    )
    return Prepared(path, stats, path / STATS)


def fetch_images(
    meta: str | Path,
    out: str | Path,
    *,
    items: str | Path | Iterable[str] | None = None,
    workers: int = 8,
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 0.5,
    skip_bad_lines: bool = False,
    progress: bool = False,
) -> Prepared:
    """Download the MAIN image of every item in Amazon Reviews 2023 ``meta`` into ``out/PARENT_ASIN.jpg``,
    or of ``items`` only (ids, or a file of one id a line such as `Prepared.missing_images`): ``workers``
    at a time, ``timeout`` seconds each, ``retries`` with backoff from ``backoff`` seconds on 5xx, 429 and
    timeouts. Resumable (images already there are kept); every download is verified to decode."""
    path = Path(out)
    wanted = read_item_list(Path(items)) if isinstance(items, str | Path) else None if items is None else set(items)
    settings = FetchSettings(workers, timeout, retries, backoff)
    report = fetch_item_images(Path(meta), path, settings, wanted, skip_bad_lines, progress)
    return Prepared(path, report, path / REPORT)


@dataclass(frozen=True)
class Run:
    """A finished (or resumable) run directory: its configuration, metrics, grouping and tables."""

    path: Path

    @property
    def config(self) -> ResolvedConfig:
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
    progress: bool | Progress = True,
    on_line: OnLine | None = None,
    log_dir: str | Path | None = None,
) -> Run:
    """Train ``config``'s method end to end into ``out`` (default ``runs/<data>-[<method>-]<peft>-seed<N>``);
    an existing run there is refused unless ``overwrite`` (`resume` continues an interrupted one).
    ``progress``: True draws tqdm bars, False none, or a `Progress` of your own gets the stage loop's
    callbacks (epochs, steps, each epoch's `EpochRecord`). ``log_dir`` also logs every epoch to TensorBoard."""
    path = Path(out) if out is not None else RunDirectory.default_path(config)
    run, _ = train_new_run(config, path, overwrite, _reporter(on_line), progress, log_dir=_path(log_dir))
    return Run(run.path)


def reseed(
    source: Run,
    seed: int,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool | Progress = True,
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
    path: str | Path,
    *,
    progress: bool | Progress = True,
    on_line: OnLine | None = None,
    log_dir: str | Path | None = None,
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


def _run_path(run: Run | str | Path) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def _analysis_file(run: Path, kind: str, subject: str, suffix: str) -> Path:
    """Where an analysis of ``subject`` (an item or user id, made safe as a file name) goes by default."""
    return RunDirectory(run).analysis_file(kind, re.sub(r"[^A-Za-z0-9._-]", "_", subject), suffix)


def learning_curves(run: Run | str | Path, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Draw the per-epoch training curves of any run (each stage's loss, validation and test HR@K and
    NDCG@K, the item vectors' term norms) as a PNG in ``out`` (default ``RUN/analysis/curves.png``; an
    existing file is refused unless ``overwrite``); returns its path. Needs the optional extra ``plot``."""
    directory = RunDirectory.open(_run_path(run))
    png = Path(out) if out is not None else directory.curves
    write_curves(directory, png, overwrite)
    return png


def attention_map(
    run: Run | str | Path,
    item: str,
    out: str | Path | None = None,
    *,
    write: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = False,
) -> tuple[TitleAttention, Path | None]:
    """CLIP's last-layer attention from the EOS token to each title token of item ``item`` under each group's
    adapters of a finished LoRA or (IA)3 PerPEFT run, averaged over heads and renormalised over the title
    tokens (each group's weights sum to 1). With ``write`` it is also drawn as a heat map in ``out``
    (default ``RUN/analysis/attention-ITEM.png``; an existing file is refused unless ``overwrite``, before
    anything is computed). Returns the attention and the PNG's path (None without ``write``)."""
    path = _run_path(run)
    png = None
    if write:
        png = Path(out) if out is not None else _analysis_file(path, "attention", item, ".png")
        refuse_existing(png, overwrite)
    (attention,) = title_attention(path, [item], device, progress)
    if png is not None:
        write_attention_heatmap(attention, png, overwrite)
    return attention, png


def divergence(
    run: Run | str | Path,
    other: Run | str | Path | None = None,
    *,
    items: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, float | int | list[int] | None]:
    """Mean Jensen–Shannon divergence (nats, at most ln 2) of `attention_map`'s attention (paper Table 7)
    over ``items`` items (a seeded sample; default all): ``inter`` between all pairs of ``run``'s groups;
    with ``other``, ``intra`` between each group and the group of ``other`` sharing most of its users
    (``matching[a] = b``, one to one; ``matched_users``: the share of users in their matched group). The
    paper's ``other`` is `reseed`'s: ``run``'s groups retrained with another seed. ``items`` and ``groups``
    in the result are the counts used."""
    second = None if other is None else _run_path(other)
    return attention_divergence(_run_path(run), second, items, device, progress)


def case_study(
    run: Run | str | Path,
    user: str,
    out: str | Path | None = None,
    *,
    k: int = 10,
    other_group: int | None = None,
    write: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = False,
) -> tuple[CaseStudy, Path | None]:
    """User ``user``'s recent history beside the top-``k`` of Global PEFT, of the user's group and of
    ``other_group`` (default: the group whose centroid is farthest), history excluded, the test item
    marked (paper Figure 5). Needs `Run.embed` first. With ``write`` it is also a self-contained HTML page
    in ``out`` (default ``RUN/analysis/case-USER.html``; an existing file is refused unless ``overwrite``,
    before anything is computed). Returns the study and the page's path (None without ``write``)."""
    path = _run_path(run)
    page = None
    if write:
        page = Path(out) if out is not None else _analysis_file(path, "case", user, ".html")
        refuse_existing(page, overwrite)
    study = user_case_study(path, user, k, other_group, device, progress)
    if page is not None:
        write_case_study_html(study, page, overwrite)
    return study, page


def serve(
    run: Run | str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    index: str = "exact",
    workers: int = 1,
    reload_seconds: float = 2.0,
    log_level: str = "info",
    on_line: OnLine | None = None,
) -> None:
    """Serve ``run``'s top-K over HTTP until stopped (the routes: [Inference and
    serving](serving.md#the-recommendation-service)). Checks the embeddings against the run, reports the
    address (to the ``perpeft`` logger and ``on_line``), then listens with ``workers`` server processes;
    items `Run.add_items` publishes are taken in within ``reload_seconds`` (0: never). ``index`` is
    ``"exact"`` or ``"hnsw"``; ``log_level`` is uvicorn's. Needs the optional extra ``serve``."""
    try:
        import uvicorn

        from perpeft.engine.service.app import (
            INDEX_VARIABLE,
            METRICS_VARIABLE,
            RELOAD_VARIABLE,
            RUN_VARIABLE,
            create_app,
        )
    except ModuleNotFoundError as error:
        raise InputError(
            f"serve needs the optional extra 'serve' ({error.name} is not installed): pip install -e \".[serve]\""
        ) from None
    path = _run_path(run)
    serving = ServingRun.open(path, index)
    dataset = serving.dataset
    _reporter(on_line)(
        f"serving {path}: {serving.groups} groups × {dataset.num_items:,} items, {dataset.num_users:,} users "
        f"({index} search) on http://{host}:{port}"
    )
    if workers == 1:
        uvicorn.run(create_app(serving, reload_seconds or None), host=host, port=port, log_level=log_level)
        return
    # Checked above, once; each worker process opens the run again through the app factory.
    del serving
    threads = str(torch.get_num_threads())  # spawned workers read torch's thread count from the environment
    metrics = tempfile.mkdtemp(prefix="perpeft-serve-metrics-")  # where the workers add up their figures
    os.environ.update(
        {
            RUN_VARIABLE: str(path.resolve()),
            INDEX_VARIABLE: index,
            RELOAD_VARIABLE: str(reload_seconds),
            METRICS_VARIABLE: metrics,
            "OMP_NUM_THREADS": threads,
        }
    )
    factory = "perpeft.engine.service.app:app_from_environment"
    try:
        uvicorn.run(factory, factory=True, workers=workers, host=host, port=port, log_level=log_level)
    finally:
        shutil.rmtree(metrics, ignore_errors=True)


def parameter_counts(
    items: int, *, clip: str = "vit-b-32", peft: str = "lora", groups: int = 8, missing_modalities: bool = False
) -> dict[str, int]:
    """Parameter count of each component for a catalog of ``items`` items, built on the meta device (no
    weights load; paper Table 8): ``clip_frozen``, ``peft_per_group``, ``projector_per_group``, ``sasrec``,
    ``transductive`` (ID and position embeddings), ``global_peft_total`` and ``perpeft_total`` (``groups``
    groups). ``clip`` is an architecture alias (``vit-b-32``, ``tiny``) or a local CLIP directory;
    ``missing_modalities`` counts the projector's placeholders for items without an image or title."""
    return count_parameters(clip, peft, groups, items, missing_modalities=missing_modalities)
