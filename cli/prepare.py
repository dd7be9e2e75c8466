"""``perpeft-engine prepare authors|amazon2023`` and ``perpeft-engine fetch-images``: real data in, through the
API's preparers."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from perpeft.cli.errors import reports_input_errors

if TYPE_CHECKING:
    from perpeft.engine.api import Prepared


def stats_summary(prepared: "Prepared") -> str:
    """The paper's Table 1 columns, missing modalities and every drop, for the terminal."""
    stats = prepared.stats
    rows = [
        f"{'# Users':>10}{'# Items':>10}{'Avg. Seq. Len.':>16}{'Density':>10}",
        f"{stats['users']:>10,}{stats['items']:>10,}{stats['avg_seq_len']:>16.4f}{stats['density']:>10.4f}",
        f"items without title: {stats['items_without_title']:,}; without image: {stats['items_without_image']:,}"
        f" (unreadable: {stats['images_unreadable']:,})",
        "dropped: " + ", ".join(f"{reason} {count:,}" for reason, count in stats["dropped"].items()),
        f"written: {prepared.path} (statistics in {prepared.report})",
    ]
    if stats["items_without_image"] == stats["items"]:
        rows.append("note: no item has an image: a catalog without images, which trains on text only")
    elif stats["items_without_image"]:
        rows.append(
            f"note: items without image are listed in {prepared.missing_images} and train with a learned placeholder"
            " image (fetch them with `perpeft-engine fetch-images --items` and prepare again with --overwrite)"
        )
    return "\n".join(rows)


@click.group()
def prepare() -> None:
    """Convert a real dataset into the engine's directory format (RecBole files, images/, stats.json)."""


@prepare.command()
@click.option(
    "--src",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory of the authors' PREFIX_final.txt, PREFIX_*_final.pickle and PREFIX_images/.",
)
@click.option(
    "--name",
    default=None,
    help="Dataset (arts, sports, toys, beauty) or any file prefix. [the one release in --src]",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Output directory. [DATA_DIR/NAME, or DATA_DIR/PREFIX]"
)
@click.option("--skip-bad-images", is_flag=True, help="Keep items whose image is unreadable, without image.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_input_errors
def authors(src: Path, name: str | None, out: Path | None, skip_bad_images: bool, overwrite: bool, quiet: bool) -> None:
    """The authors' released files → a dataset directory (timestamps: line numbers, which keep the order)."""
    from perpeft.engine import api

    prepared = api.prepare_authors(
        src, name=name, out=out, skip_bad_images=skip_bad_images, overwrite=overwrite, progress=not quiet
    )
    click.echo(stats_summary(prepared))


@prepare.command()
@click.option("--reviews", type=click.Path(path_type=Path), required=True, help="Reviews JSONL, gzip'ed or not.")
@click.option("--meta", type=click.Path(path_type=Path), required=True, help="Item metadata JSONL, gzip'ed or not.")
@click.option(
    "--images", type=click.Path(path_type=Path), required=True, help="Directory of PARENT_ASIN.jpg (fetch-images)."
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option(
    "--user-fraction",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.4,
    show_default=True,
    help="Users kept by the seeded subsample (paper: 0.4 Arts; 0.2 Sports, Toys, Beauty).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the user subsample.")
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count malformed lines and records.")
@click.option("--skip-bad-images", is_flag=True, help="Keep items whose image is unreadable, without image.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_input_errors
def amazon2023(out: Path, quiet: bool, **options: Any) -> None:
    """Raw Amazon Reviews 2023 → a dataset directory: user subsample, dedupe, 5-core, time order (App. B.2)."""
    from perpeft.engine import api

    click.echo(stats_summary(api.prepare_amazon2023(out=out, progress=not quiet, **options)))


@click.command("fetch-images")
@click.option("--meta", type=click.Path(path_type=Path), required=True, help="Item metadata JSONL, gzip'ed or not.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Image directory (PARENT_ASIN.jpg).")
@click.option(
    "--items",
    type=click.Path(path_type=Path),
    default=None,
    help="Only these item ids (one a line), e.g. a prepared dataset's missing_images.txt.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=8, show_default=True, help="Concurrent downloads.")
@click.option("--timeout", type=click.FloatRange(0.0, min_open=True), default=10.0, show_default=True, help="Seconds.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True, help="On 5xx, 429 and timeouts.")
@click.option("--backoff", type=click.FloatRange(min=0.0), default=0.5, show_default=True, help="First wait (s).")
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count malformed meta lines.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_input_errors
def fetch_images(
    meta: Path,
    out: Path,
    items: Path | None,
    workers: int,
    timeout: float,
    retries: int,
    backoff: float,
    skip_bad_lines: bool,
    quiet: bool,
) -> None:
    """Download each item's MAIN image (verified, resumable); failures go to OUT/fetch_report.json."""
    from perpeft.engine import api

    fetched = api.fetch_images(
        meta,
        out,
        items=items,
        workers=workers,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        skip_bad_lines=skip_bad_lines,
        progress=not quiet,
    )
    report = fetched.stats
    click.echo(
        f"downloaded {report['downloaded']:,}, already present {report['present']:,}, failed {report['failed']:,},"
        f" without MAIN image URL {report['without_url']:,}, not in meta {report['not_in_meta']:,};"
        f" report: {fetched.report}"
    )
