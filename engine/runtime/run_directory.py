"""The run directory: the one place that names the files inside a run.

Layout (all written atomically)::

    config.json                        the run's RunConfig
    state.json                         progress: per-stage history, best epoch, grouping sizes, done
    metrics.json                       the finished run's summary
    <stage>/epoch-NNN.safetensors      the last completed epoch: trainable weights + optimizer state
    <stage>/best.safetensors           the best epoch by validation HR@30
    global/snapshot-e1.safetensors     Global PEFT at epoch E1, where the second stage starts
    grouping.safetensors               user → group assignment and centroids
    embeddings/                        `embed`'s per-group item tables, user vectors, snapshot table, ids
    embeddings/additions/NNNN.safetensors  items added after training (`embed --add-items`), one file each
    embeddings/catalog.json            the added items and their files, written last: the catalog's version
    embeddings/hnsw/                   `serve --index hnsw`'s graphs of the trained tables, by content hash
    analysis/                          `analyze` pages and heat maps
    .lock                              the writer lock and its holder (`run_lock.py`)
"""

import shutil
from pathlib import Path
from typing import Any

import torch

from perpeft.engine.config.run_config import ResolvedConfig, RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.atomic import atomic_write_bytes, atomic_write_json, read_json
from perpeft.engine.runtime.records import RunMetrics
from perpeft.engine.runtime.run_lock import LOCK
from perpeft.engine.runtime.run_state import RunState
from perpeft.engine.runtime.tensors import load_tensors

CONFIG = "config.json"
STATE = "state.json"
METRICS = "metrics.json"
SNAPSHOT = "global/snapshot-e1.safetensors"
GROUPING = "grouping.safetensors"
EMBEDDINGS = "embeddings"


class RunDirectory:
    """A run on disk: its configuration, progress state, metrics, checkpoints, grouping and embeddings."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def holds_run(path: Path) -> bool:
        """Whether ``path`` is a run directory (it has a ``config.json``)."""
        return (path / CONFIG).is_file()

    @staticmethod
    def check_new(path: Path, overwrite: bool) -> None:
        """InputError unless ``path`` may become a new run: absent, empty, or replaced with ``overwrite``."""
        occupied = path.exists() and (not path.is_dir() or any(entry.name != LOCK for entry in path.iterdir()))
        if occupied and not overwrite:
            raise InputError(f"{path}: run directory exists; pass --overwrite to replace it or --resume to continue")

    @classmethod
    def create(cls, path: Path, config: ResolvedConfig, overwrite: bool) -> "RunDirectory":
        """A new run; an existing non-empty directory is refused unless ``overwrite``. The caller holds the
        directory's writer lock (`holding_run_lock`), which replacing the directory keeps."""
        cls.check_new(path, overwrite)
        if path.is_dir():
            for entry in path.iterdir():
                if entry.name == LOCK:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        elif path.exists():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_bytes(path / CONFIG, (config.to_json() + "\n").encode())
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDirectory":
        if not cls.holds_run(path):
            raise InputError(f"{path}: not a run directory (no {CONFIG})")
        return cls(path)

    @staticmethod
    def default_path(config: RunConfig) -> Path:
        """Where `train` puts a run without ``--out``: ``runs/DATA-[METHOD-]PEFT-seedN`` (PerPEFT unnamed)."""
        method = "" if config.method == "perpeft" else f"{config.method}-"
        return Path("runs") / f"{Path(config.data).name}-{method}{config.peft}-seed{config.seed}"

    def reseed_path(self, seed: int) -> Path:
        """Where a run reseeded from this one with ``seed`` goes by default: ``RUN-reseed-SEED`` beside it."""
        return self.path.with_name(f"{self.path.name}-reseed-{seed}")

    @property
    def config(self) -> ResolvedConfig:
        """The settings the run trained with (its ``config.json``)."""
        return ResolvedConfig.from_json_file(self.path / CONFIG)

    def read_state(self) -> RunState:
        """The run's progress (empty before its first epoch); InputError naming ``state.json`` if it is damaged."""
        path = self.path / STATE
        if not path.is_file():
            return RunState()
        try:
            return RunState.from_json(read_json(path), str(path))
        except InputError as error:
            raise InputError(f"{error}: the run cannot resume; start it again with --overwrite") from None

    def write_state(self, state: RunState) -> None:
        atomic_write_json(self.path / STATE, state.to_json())

    @property
    def finished(self) -> bool:
        """Whether the run wrote its ``metrics.json``."""
        return (self.path / METRICS).is_file()

    def write_metrics(self, metrics: RunMetrics) -> None:
        atomic_write_json(self.path / METRICS, metrics.to_json())

    def read_run_metrics(self) -> RunMetrics:
        """``metrics.json``, written when the run finishes; InputError before that, or naming the file when
        it is not a run's metrics."""
        if not self.finished:
            raise InputError(f"{self.path}: run not finished (no {METRICS}); finish it with `train --resume`")
        path = self.path / METRICS
        return RunMetrics.from_json(read_json(path), str(path))

    def read_metrics(self) -> dict[str, Any]:
        """`read_run_metrics` as the JSON object in the file (what ``perpeft.Run.metrics`` returns)."""
        return self.read_run_metrics().to_json()

    def checkpoint(self, stage: str, epoch: int) -> Path:
        """The weights and optimizer state of ``stage`` after ``epoch`` (only the last one is kept)."""
        return self.path / stage / f"epoch-{epoch:03d}.safetensors"

    def best(self, stage: str) -> Path:
        """Where ``stage``'s best-epoch weights are written during training."""
        return self.path / stage / "best.safetensors"

    def best_checkpoint(self, stage: str) -> Path:
        """The selected best-epoch weights of ``stage`` ("global" or "perpeft") of a finished run."""
        metrics = self.read_run_metrics()
        if stage not in metrics.stages:
            raise InputError(
                f"{self.path}: a --method {metrics.method} run has no {stage} stage "
                "(embed, evaluate, recommend and export serve PerPEFT runs)"
            )
        return self.best(stage)

    def stage_files(self, stage: str) -> list[Path]:
        """Every file ``stage`` has written (checkpoints, best weights, snapshot), temporary files excluded."""
        directory = self.path / stage
        return sorted(path for path in directory.iterdir() if path.is_file() and not path.name.startswith("."))

    @property
    def snapshot(self) -> Path:
        """Global PEFT's weights at epoch E1, the second stage's starting point."""
        return self.path / SNAPSHOT

    @property
    def grouping(self) -> Path:
        """The user → group assignment and the centroids."""
        return self.path / GROUPING

    def read_grouping(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The assignment ``[U+1]`` and centroids ``[C, d]``; InputError naming the file if it is damaged."""
        tensors, _ = load_tensors(self.grouping, {"assignment": None, "centroids": None})
        return tensors["assignment"], tensors["centroids"]

    @property
    def embeddings(self) -> Path:
        """`embed`'s output directory."""
        return self.path / EMBEDDINGS

    @property
    def curves(self) -> Path:
        """Where `analyze curves` draws the run's per-epoch training curves."""
        return self.path / "analysis" / "curves.png"

    def analysis_file(self, kind: str, subject: str, suffix: str) -> Path:
        """Where `analyze` writes ``kind`` ("attention", "case") about ``subject`` (an item or user id)."""
        return self.path / "analysis" / f"{kind}-{subject}{suffix}"

    @property
    def embedded_items(self) -> Path:
        """Per-group item tables ``[C, I+1, d]``."""
        return self.embeddings / "items.safetensors"

    @property
    def embedded_users(self) -> Path:
        """User vectors, their groups and the centroids."""
        return self.embeddings / "users.safetensors"

    @property
    def embedded_ids(self) -> Path:
        """The original user and item ids of the tables' rows."""
        return self.embeddings / "ids.json"

    @property
    def embedded_snapshot(self) -> Path:
        """The Global-PEFT snapshot's item table ``[1, I+1, d]``, which places new users in a group."""
        return self.embeddings / "snapshot.safetensors"

    @property
    def embedding_chunks(self) -> Path:
        """`embed`'s resumable partial chunks while it runs."""
        return self.embeddings / ".partial"

    @property
    def embedded_catalog(self) -> Path:
        """Items added after training (`embed --add-items`): their ids, texts, images and table files."""
        return self.embeddings / "catalog.json"

    @property
    def search_graphs(self) -> Path:
        """`serve --index hnsw`'s per-group graphs, kept for the next start (derived: safe to delete)."""
        return self.embeddings / "hnsw"

    def embedded_addition(self, version: int) -> Path:
        """The tables of the items that catalog version ``version`` added."""
        return self.embeddings / "additions" / f"{version:04d}.safetensors"

    @property
    def embedding_outputs(self) -> tuple[Path, Path, Path, Path]:
        """The four files a finished `embed` has written."""
        return self.embedded_items, self.embedded_users, self.embedded_snapshot, self.embedded_ids
