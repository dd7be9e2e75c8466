"""How every command reports bad input: one line on stderr, exit status 2, no traceback."""

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from perpeft.engine.errors import InputError


def reports_input_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input → one line on stderr and exit status 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except InputError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper
