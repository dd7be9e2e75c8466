"""``perpeft-engine serve``: the HTTP recommendation service over a run's cached tables."""

from pathlib import Path

import click

from perpeft.cli.errors import reports_input_errors
from perpeft.cli.inference import run_option
from perpeft.cli.options import choice_option
from perpeft.engine.config.choices import SEARCH_INDEX


@click.command()
@run_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@choice_option(SEARCH_INDEX)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server processes sharing the port, each with the run's tables (one per core to spare).",
)
@click.option(
    "--reload-seconds",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="How often to look for items added by `embed --add-items` (0: never).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
    help="uvicorn's log level (access lines at info).",
)
@reports_input_errors
def serve(run: Path, host: str, port: int, index: str, workers: int, reload_seconds: float, log_level: str) -> None:
    """Serve RUN's top-K over HTTP: POST /recommend and /recommend/batch, GET /items/{id}, /case/{user},
    /health, /ready, /metrics; the OpenAPI schema at /openapi.json, its pages at /docs.

    Reads RUN/embeddings (run `embed` first) and checks them against the run before it listens; items
    that `embed --add-items` adds later are taken in within --reload-seconds of being published, each
    worker swapping its whole tables at once. Needs the optional extra `serve`: pip install -e ".[serve]".
    """
    from perpeft.engine import api

    api.serve(
        run,
        host=host,
        port=port,
        index=index,
        workers=workers,
        reload_seconds=reload_seconds,
        log_level=log_level,
        on_line=lambda line: click.echo(line, err=True),
    )
