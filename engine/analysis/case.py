"""The recommendation case study (paper §4.4, Figure 5): one user's recent purchases beside the top-K of
Global PEFT, of the PEFT module of the user's own group and of another group's PEFT module.

The protocol is evaluation's test step: the user's history is the training sequence plus the validation
item (SASRec reads its last ``maxlen`` items, the ones shown), every history item is excluded from every
list, and the user's test item is marked as purchased where it appears. (`recommend --user` differs on
purpose: it serves from everything the user bought, test item included.) A user with fewer than three
purchases has no test item; all of its purchases are its history.

- Global PEFT: the run's ``global/best.safetensors`` (one adapter, one group; with ``--baseline`` the
  E1+E2-epoch baseline, else stage 1's best). Its item table is encoded here, every item through CLIP.
- Own group, other group: the best-epoch PerPEFT tables cached by ``embed``; the user is read through
  the group's table with the shared SASRec and scored against that table, as `recommend` scores.
  The other group defaults to the group whose K-Means centroid lies farthest (Euclidean) from the
  user's group's centroid in the grouping space: the most different interests, like the paper's golf
  and camping groups.

Thumbnails are JPEGs made from the dataset's image files and embedded in the HTML page as base64, so
the page is one self-contained file; an item without a readable image file shows a placeholder.
"""

import base64
import html
import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from perpeft.engine.analysis import open_perpeft_run, refuse_existing
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import leave_one_out
from perpeft.engine.errors import InputError
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.runtime.atomic import atomic_write_bytes
from perpeft.engine.runtime.device import resolve_device
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.embed import Embeddings, grouped_item_tables, load_embeddings, load_model
from perpeft.engine.serve.recommend import engine_indices, top_k

THUMBNAIL_SIZE = 128


@dataclass
class CaseItem:
    """One item of a column: engine index, dataset id, title, score (None in the history), whether it is
    the user's test item, and a JPEG thumbnail (None without a readable image file)."""

    index: int
    item: str
    title: str
    score: float | None
    purchased: bool
    thumbnail: bytes | None


@dataclass
class CaseStudy:
    """A user's recent history and the columns of recommendations (heading, items best first)."""

    run: str
    user: str
    group: int
    other_group: int
    group_sizes: list[int]
    test_item: str | None
    history: list[CaseItem]
    columns: list[tuple[str, list[CaseItem]]]


def thumbnail(path: Path | None) -> bytes | None:
    """A JPEG of the image at ``path`` shrunk to fit ``THUMBNAIL_SIZE`` pixels; None when unreadable."""
    if path is None:
        return None
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def farthest_group(centroids: torch.Tensor, group: int) -> int:
    """The group whose centroid is farthest (Euclidean) from ``group``'s."""
    return int(torch.cdist(centroids[group : group + 1], centroids)[0].argmax())


class CaseStudies:
    """Case studies of one finished PerPEFT run, any number of users: the run, its dataset and cached tables
    are read once; Global PEFT's item table is encoded on the first study and kept (thread-safe)."""

    def __init__(
        self,
        run: RunDirectory,
        dataset: Dataset,
        embeddings: Embeddings,
        perpeft: PerpeftModel,
        device: str | None = None,
        progress: bool = False,
    ) -> None:
        """``perpeft`` is the run's best PerPEFT model without an item encoder (`load_model`), which scores
        from the cached tables; the service passes the one it already serves with."""
        self.run, self.dataset, self.embeddings, self.perpeft = run, dataset, embeddings, perpeft
        self.device, self.progress = device, progress
        self._global: tuple[PerpeftModel, torch.Tensor] | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, run_dir: Path, device: str | None = None, progress: bool = False) -> "CaseStudies":
        """InputError when ``run_dir`` is not a finished PerPEFT run of at least two groups with embeddings."""
        run = open_perpeft_run(run_dir)
        if run.config.groups < 2:
            raise InputError(f"{run.path}: one group only; the case study compares the user's group with another")
        dataset = run_dataset(run.config)
        perpeft = load_model(run, run.best_checkpoint("perpeft"), run.config.groups, dataset.num_items)
        return cls(run, dataset, load_embeddings(run), perpeft, device, progress)

    def global_peft(self) -> tuple[PerpeftModel, torch.Tensor]:
        """Global PEFT's model (on the CPU) and its item table ``[1, I+1, d]``, encoded once."""
        with self._lock:
            if self._global is None:
                # Imported here: run_inputs loads transformers (seconds), which a service needs only now.
                from perpeft.engine.model.run_inputs import load_run_inputs

                config = self.run.config
                run_inputs = load_run_inputs(config, self.dataset, self.progress)
                model = load_model(self.run, self.run.best_checkpoint("global"), 1, self.dataset.num_items, run_inputs)
                tables = grouped_item_tables(
                    model.to(resolve_device(self.device or config.device)),
                    self.dataset.num_items,
                    config.encode_batch_size,
                    None,
                    self.progress,
                )
                self._global = model.cpu(), tables
            return self._global

    def study(self, user_id: str, k: int = 10, other_group: int | None = None) -> CaseStudy:
        """The case study of dataset user ``user_id`` (module docstring); InputError for an unknown user,
        ``k`` below one or a bad ``other_group``."""
        config, dataset, embeddings = self.run.config, self.dataset, self.embeddings
        if k < 1:
            raise InputError(f"--k {k}: must be at least 1")
        user = int(engine_indices(dataset.user_ids, [user_id], "--user")[0])
        group = int(embeddings.groups[user])
        if other_group is None:
            other_group = farthest_group(embeddings.centroids, group)
        elif not 0 <= other_group < config.groups or other_group == group:
            raise InputError(
                f"--other-group {other_group}: expected a group in 0..{config.groups - 1} other than the user's ({group})"
            )
        split = leave_one_out(dataset.sequences)
        history = split.history("test")[user]
        test_item = int(split.test_target[user])
        global_model, global_tables = self.global_peft()
        ranked = {
            "Global PEFT": top_k(global_model, global_tables, history, 0, k, config.maxlen),
            f"PerPEFT · own group {group}": top_k(self.perpeft, embeddings.items, history, group, k, config.maxlen),
            f"PerPEFT · group {other_group}": top_k(
                self.perpeft, embeddings.items, history, other_group, k, config.maxlen
            ),
        }

        def entry(index: int, score: float | None) -> CaseItem:
            return CaseItem(
                index,
                str(dataset.item_ids[index]),
                dataset.titles[index],
                score,
                index == test_item,
                thumbnail(dataset.image_paths[index]),
            )

        return CaseStudy(
            str(self.run.path),
            user_id,
            group,
            other_group,
            np.bincount(embeddings.groups[1:].numpy(), minlength=config.groups).tolist(),
            str(dataset.item_ids[test_item]) if test_item else None,
            [entry(int(index), None) for index in history[-config.maxlen :]],
            [
                (heading, [entry(index, score) for index, score in zip(items, scores, strict=True)])
                for heading, (items, scores) in ranked.items()
            ],
        )


def case_study(
    run_dir: Path,
    user_id: str,
    k: int = 10,
    other_group: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> CaseStudy:
    """The case study of dataset user ``user_id`` in a finished PerPEFT run (module docstring).

    Needs the run's embeddings (``embed``); encodes Global PEFT's item table on ``device`` (default: the
    run's). InputError for an unknown user, a bad ``other_group`` or a run that is not a finished PerPEFT run.
    """
    return CaseStudies.open(run_dir, device, progress).study(user_id, k, other_group)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.3rem; margin-bottom: 0.2rem; }
p.meta { color: #555; margin-top: 0; }
.columns { display: grid; grid-template-columns: repeat(4, minmax(12rem, 1fr)); gap: 1rem; align-items: start; }
section h2 { font-size: 1rem; border-bottom: 2px solid #ccc; padding-bottom: 0.3rem; }
ol { list-style: none; padding: 0; margin: 0; }
li { display: flex; gap: 0.6rem; align-items: center; padding: 0.4rem; margin-bottom: 0.4rem;
     border: 2px solid #e4e4e4; border-radius: 6px; }
li.purchased { border-color: #2e9d4a; background: #eef9f0; }
li img, li .noimage { width: 64px; height: 64px; object-fit: contain; flex: none; }
li .noimage { background: #eee; color: #999; font-size: 0.7rem; display: flex; align-items: center;
              justify-content: center; }
.title { font-size: 0.85rem; }
.small { font-size: 0.75rem; color: #666; }
.badge { background: #2e9d4a; color: white; font-size: 0.7rem; padding: 0.05rem 0.35rem; border-radius: 4px; }
"""


def _card(rank: int | None, entry: CaseItem) -> str:
    image = (
        f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(entry.thumbnail).decode()}">'
        if entry.thumbnail is not None
        else '<div class="noimage">no image</div>'
    )
    details = [html.escape(entry.item)]
    if entry.score is not None:
        details.append(f"score {entry.score:.3f}")
    badge = ' <span class="badge">Purchased</span>' if entry.purchased else ""
    prefix = f"{rank}. " if rank is not None else ""
    marked = ' class="purchased"' if entry.purchased else ""
    return (
        f"<li{marked}>{image}<div>"
        f'<div class="title">{prefix}{html.escape(entry.title)}{badge}</div>'
        f'<div class="small">{" · ".join(details)}</div></div></li>'
    )


def case_study_html(case: CaseStudy) -> str:
    """A self-contained HTML page: the history (oldest first) and each column of recommendations side by side."""
    sections = [
        "<section><h2>Recent history (oldest first)</h2><ol>"
        + "".join(_card(None, entry) for entry in case.history)
        + "</ol></section>"
    ]
    for heading, entries in case.columns:
        cards = "".join(_card(rank, entry) for rank, entry in enumerate(entries, start=1))
        sections.append(f"<section><h2>{html.escape(heading)}</h2><ol>{cards}</ol></section>")
    sizes = case.group_sizes
    test = html.escape(case.test_item) if case.test_item is not None else "none (fewer than 3 purchases)"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>PerPEFT case study: user {html.escape(case.user)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Case study · user {html.escape(case.user)}</h1>"
        f'<p class="meta">run {html.escape(case.run)} · own group {case.group} ({sizes[case.group]} users) · '
        f"other group {case.other_group} ({sizes[case.other_group]} users) · test item {test} · "
        "history items excluded from every list</p>"
        f'<div class="columns">{"".join(sections)}</div></body></html>\n'
    )


def write_case_study_html(case: CaseStudy, path: Path, overwrite: bool = False) -> None:
    """Write `case_study_html` to ``path`` atomically, refusing an existing file unless ``overwrite``."""
    refuse_existing(path, overwrite)
    atomic_write_bytes(path, case_study_html(case).encode())
