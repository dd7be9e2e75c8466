"""What the data tests share: the one-line input error a call raises."""

from collections.abc import Callable

import pytest

from perpeft.engine.errors import InputError


@pytest.fixture
def error_of() -> Callable[..., str]:
    """``error_of(call, *args, **kwargs)``: the InputError message the call raises, checked to be one line."""

    def raised(call: Callable[..., object], *args: object, **kwargs: object) -> str:
        with pytest.raises(InputError) as caught:
            call(*args, **kwargs)
        message = str(caught.value)
        assert "\n" not in message
        return message

    return raised
