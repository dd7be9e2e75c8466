"""``perpeft-engine embed|evaluate|recommend|export``: serve a finished run."""

import json
from pathlib import Path

import click

from perpeft.cli.distributed import runs_distributed
from perpeft.cli.errors import reports_input_errors
from perpeft.engine.config.choices import DEFAULT_K

run_option = click.option(
    "--run", "run", type=click.Path(path_type=Path), required=True, help="A finished run directory (of `train`)."
)


@click.command()
@run_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="(item, group) pairs per pass: this many // C items, each encoded under every group. [the run's encode_batch_size]",
)
@click.option("--device", default=None, help="'cpu', 'cuda', 'cuda:1'… [the run's device]")
@click.option(
    "--add-items",
    "add_items",
    type=click.Path(path_type=Path),
    default=None,
    help="A RecBole item file of new items (images in images/ beside it): add them to the tables, no retraining.",
)
@click.option("--overwrite", is_flag=True, help="Recompute existing embeddings (added items are kept).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_input_errors
@runs_distributed("device")
def embed(
    run: Path, batch_size: int | None, device: str | None, add_items: Path | None, overwrite: bool, quiet: bool
) -> None:
    """Cache every group's item table and every user's vector in RUN/embeddings (resumable after interruption).

    With --add-items FILE, encode FILE's items through every group's adapters (and the Global-PEFT
    snapshot) and publish them as the catalog's next version: `recommend` and a running `serve` include
    them. An added item has no ID embedding, so its vector is the multimodal term alone.
    """
    from perpeft.engine import api
    from perpeft.engine.errors import InputError
    from perpeft.engine.runtime.run_directory import RunDirectory

    opened = api.open_run(run)
    if add_items is not None:
        if overwrite:
            raise InputError("give --add-items or --overwrite, not both")
        catalog, added = opened.add_items(add_items, batch_size, device, progress=not quiet)
        click.echo(
            f"added {added:,} items (catalog version {catalog.version}, {len(catalog.items):,} added in all);"
            f" written to {RunDirectory(run).embedded_catalog}"
        )
        return
    embeddings = opened.embed(batch_size, overwrite, device, progress=not quiet)
    groups, rows, width = embeddings.items.shape
    click.echo(
        f"item tables: {groups} groups × {rows - 1:,} items × {width}; user vectors: {embeddings.users.shape[0] - 1:,};"
        f" written to {RunDirectory(run).embeddings}"
    )


@click.command()
@run_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_input_errors
@runs_distributed("device")
def evaluate(run: Path, as_json: bool) -> None:
    """Recompute PerPEFT's validation and test metrics from the embeddings and compare them with metrics.json."""
    from perpeft.engine import api
    from perpeft.engine.eval.report import largest_difference

    opened = api.open_run(run)
    metrics = opened.evaluate()
    difference = largest_difference(metrics, opened.metrics["perpeft"])
    if as_json:
        click.echo(json.dumps({**metrics, "max_abs_difference": difference}, indent=2))
        return
    names = list(metrics["test"])
    click.echo(f"{'':<8}" + "".join(f"{name:>10}" for name in names))
    for stage, values in metrics.items():
        click.echo(f"{stage:<8}" + "".join(f"{values[name]:>10.4f}" for name in names))
    click.echo(f"largest difference from metrics.json: {difference:.1e}")


def id_list(text: str | None) -> list[str] | None:
    """Comma-separated ids as a list (blanks dropped); None stays None."""
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


@click.command()
@run_option
@click.option("--user", default=None, help="A known user's id: scored from everything the user bought.")
@click.option("--history", default=None, help="A new user's item ids, oldest first, comma-separated.")
@click.option("--exclude", default=None, help="Item ids never to recommend, comma-separated (beside the user's own).")
@click.option("--k", type=click.IntRange(min=1), default=DEFAULT_K, show_default=True, help="How many items.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_input_errors
def recommend(run: Path, user: str | None, history: str | None, exclude: str | None, k: int, as_json: bool) -> None:
    """Top-K items for a known user (--user) or a new user's purchases (--history), the user's items excluded.

    Reads RUN/embeddings: run `embed` first. A known user is scored with its group's item table; a new user
    joins the group of the nearest K-Means centroid under the Global-PEFT snapshot (read through its cached
    item table) and is then scored the same way. `serve` answers the same requests over HTTP.
    """
    from perpeft.engine import api
    from perpeft.engine.errors import InputError

    if (user is None) == (history is None):
        raise InputError("give exactly one of --user and --history")
    result = api.open_run(run).recommend(user=user, history=id_list(history), k=k, exclude=id_list(exclude) or ())
    rows = list(zip(result.items, result.titles, result.scores, strict=True))
    if as_json:
        ranked = [
            {"rank": rank, "item": item, "title": title, "score": score}
            for rank, (item, title, score) in enumerate(rows, start=1)
        ]
        click.echo(
            json.dumps(
                {
                    "user": result.user,
                    "group": result.group,
                    "assigned_by": result.assigned_by,
                    "history": result.history,
                    "recommendations": ranked,
                },
                indent=2,
            )
        )
        return
    who = f"user {result.user}" if result.user is not None else "new user (nearest centroid)"
    click.echo(f"{who} · group {result.group} · {len(result.history)} history items excluded")
    width = max([len("item"), *(len(item) for item in result.items)])
    click.echo(f"{'rank':>4}  {'item':<{width}}  {'score':>9}  title")
    for rank, (item, title, score) in enumerate(rows, start=1):
        click.echo(f"{rank:>4}  {item:<{width}}  {score:>9.4f}  {title}")


@click.command()
@run_option
@click.option("--group", type=click.IntRange(min=0), required=True, help="The group c, in 0..C-1.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Adapter directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace the adapter files in a non-empty --out.")
@reports_input_errors
def export(run: Path, group: int, out: Path, overwrite: bool) -> None:
    """Write one group's LoRA or (IA)3 adapter as a Hugging Face peft directory (`PeftModel.from_pretrained`)."""
    from perpeft.engine import api
    from perpeft.engine.serve.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    settings = api.open_run(run).export_adapter(group, out, overwrite)
    click.echo(f"{settings['peft_type']} adapter of group {group}: {out / ADAPTER_CONFIG}, {out / ADAPTER_WEIGHTS}")
