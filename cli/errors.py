"""How every command reports a failure it expects: one line on stderr and an exit status, no traceback."""

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from perpeft.engine.errors import InputError, RunError


def reports_input_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input → exit status 2; a run that cannot go on (divergence, a failed write) or any other
    operating-system error (the file it names) → exit status 1. One line on stderr each, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except InputError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except RunError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            click.echo(f"error: {where}{error.strerror or error}", err=True)
            sys.exit(1)

    return wrapper
