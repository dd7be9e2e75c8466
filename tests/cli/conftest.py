"""What every CLI test checks about bad input: exit status 2 and one line on stderr, no traceback."""

from collections.abc import Callable

import pytest
from click.testing import Result


def _assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def assert_one_line_error() -> Callable[..., None]:
    """``assert_one_line_error(result, *fragments)``: exit status 2, one stderr line holding every fragment."""
    return _assert_one_line_error
