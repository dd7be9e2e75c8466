"""``perpeft-engine analyze curves|attention|divergence|case``: training curves of any run, and a look inside
a finished PerPEFT run (paper §4.4, §4.5, App. C.5.1)."""

import json
import math
import shutil
from pathlib import Path

import click

from perpeft.cli.errors import reports_input_errors

run_option = click.option(
    "--run", "run", type=click.Path(path_type=Path), required=True, help="A finished PerPEFT run directory."
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


@click.group()
def analyze() -> None:
    """Training curves, attention per group, its divergence between groups and seeds, and a user's
    recommendations side by side."""


@analyze.command()
@click.option("--run", "run", type=click.Path(path_type=Path), required=True, help="A run directory (any method).")
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Output. [RUN/analysis/curves.png]")
@overwrite_option
@reports_input_errors
def curves(run: Path, png: Path | None, overwrite: bool) -> None:
    """Per-epoch training curves of both stages: loss, and HR@K and NDCG@K on validation and test."""
    from perpeft.engine import api

    click.echo(f"curves: {api.learning_curves(run, png, overwrite=overwrite)}")


@analyze.command()
@run_option
@click.option("--item", required=True, help="The item's dataset id.")
@click.option(
    "--png", type=click.Path(path_type=Path), default=None, help="Heat map. [RUN/analysis/attention-ITEM.png]"
)
@click.option("--no-png", is_flag=True, help="Print the weights only.")
@overwrite_option
@reports_input_errors
def attention(run: Path, item: str, png: Path | None, no_png: bool, overwrite: bool) -> None:
    """CLIP's last-layer attention from the EOS token to each title token under each group's adapters.

    Averaged over heads and renormalised over the title tokens (BOS, EOS and padding excluded), so each
    group's weights sum to 1; the highest is marked with *. LoRA and (IA)3 runs only.
    """
    from perpeft.engine import api

    result, written = api.attention_map(run, item, png, write=not no_png, overwrite=overwrite)
    click.echo(f"item {result.item}: {result.title}")
    for group, (weights, size) in enumerate(zip(result.weights, result.group_sizes, strict=True)):
        strongest = int(weights.argmax())
        pairs = [
            f"{token}:{weight:.3f}{'*' if index == strongest else ''}"
            for index, (token, weight) in enumerate(zip(result.tokens, weights, strict=True))
        ]
        click.echo(f"group {group} ({size} users)  " + "  ".join(pairs))
    if written is not None:
        click.echo(f"heat map: {written}")


@analyze.command()
@run_option
@click.option(
    "--run2",
    type=click.Path(path_type=Path),
    default=None,
    help="RUN's groups trained with another seed (`train --global-from RUN --seed N`), or any run of the same "
    "setting: intra-group JSD.",
)
@click.option(
    "--items", type=click.IntRange(min=1), default=None, help="A seeded random sample of N items. [every item]"
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@quiet_option
@reports_input_errors
def divergence(run: Path, run2: Path | None, items: int | None, as_json: bool, quiet: bool) -> None:
    """Mean Jensen–Shannon divergence (nats, at most ln 2) of the EOS→title attention (paper Table 7).

    Inter: between all pairs of groups of RUN. Intra (with --run2): between each group of RUN and the
    group of RUN2 sharing most of its users (one-to-one matching of the two groupings). The paper's intra
    runs are the same groups trained with another seed: make RUN2 with `train --global-from RUN --seed N`
    (all users then stay in their matched group); a RUN2 trained end to end with another seed groups the
    users differently, and the line "users in the matched group" says by how much.
    """
    from perpeft.engine import api

    result = api.divergence(run, run2, items=items, progress=not quiet)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"Jensen–Shannon divergence of EOS→title attention (nats, at most ln 2 = {math.log(2):.4f}), "
        f"mean over {result['items']:,} items, {result['groups']} groups"
    )
    intra = "n/a (give --run2)" if result["intra"] is None else f"{result['intra']:.4g}"
    click.echo(f"{'Intra-clus.':<13}{intra}")
    click.echo(f"{'Inter-clus.':<13}{result['inter']:.4g}")
    matching = result["matching"]
    if isinstance(matching, list):
        pairs = ", ".join(f"{a}→{b}" for a, b in enumerate(matching))
        click.echo(f"groups of --run matched to --run2: {pairs}")
        click.echo(f"users in the matched group: {result['matched_users']:.1%}")


def _columns(headings: list[str], cells: list[list[str]]) -> list[str]:
    """Text columns side by side, each as wide as the terminal allows, cells cut with …."""
    width = max(16, (shutil.get_terminal_size((160, 24)).columns - 2 * (len(headings) - 1)) // len(headings))

    def fit(text: str) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    rows = [headings, ["-" * width] * len(headings)]
    rows += [[column[row] if row < len(column) else "" for column in cells] for row in range(max(map(len, cells)))]
    return ["  ".join(f"{fit(cell):<{width}}" for cell in row).rstrip() for row in rows]


@analyze.command()
@run_option
@click.option("--user", required=True, help="The user's dataset id.")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Items per list.")
@click.option(
    "--other-group",
    type=click.IntRange(min=0),
    default=None,
    help="The group to contrast with. [the group whose centroid is farthest from the user's]",
)
@click.option(
    "--html", "page", type=click.Path(path_type=Path), default=None, help="Page. [RUN/analysis/case-USER.html]"
)
@overwrite_option
@quiet_option
@reports_input_errors
def case(
    run: Path, user: str, k: int, other_group: int | None, page: Path | None, overwrite: bool, quiet: bool
) -> None:
    """A user's recent history beside the top-K of Global PEFT, its own group's and another group's PEFT.

    Evaluation's test step: history = train + validation item, excluded from every list; the user's test
    item is marked * (Purchased on the page). Reads RUN/embeddings: run `embed` first.
    """
    from perpeft.engine import api

    study, written = api.case_study(
        run, user, page, k=k, other_group=other_group, overwrite=overwrite, progress=not quiet
    )
    test = f"test item {study.test_item}" if study.test_item is not None else "no test item"
    click.echo(f"user {study.user} · group {study.group} · contrasted with group {study.other_group} · {test}")
    headings = ["history (oldest first)", *(heading for heading, _ in study.columns)]
    cells = [[entry.title for entry in study.history]]
    cells += [
        [f"{rank}. {'*' if entry.purchased else ''}{entry.title}" for rank, entry in enumerate(entries, start=1)]
        for _, entries in study.columns
    ]
    for line in _columns(headings, cells):
        click.echo(line)
    click.echo(f"page: {written}")
