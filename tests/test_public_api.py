"""The analyses, the service and the parameter counts are public names of `perpeft`, as the CLI's other
commands are (their behaviour is covered through the CLI tests)."""

import pytest

import perpeft
from perpeft.engine import api

NAMES = ["attention_map", "case_study", "divergence", "learning_curves", "parameter_counts", "serve"]
TYPES = ["CaseItem", "CaseStudy", "TitleAttention"]


@pytest.mark.parametrize("name", NAMES + TYPES)
def test_the_name_is_reachable_from_perpeft(name: str) -> None:
    assert name in perpeft.__all__
    assert getattr(perpeft, name) is getattr(api, name)


@pytest.mark.parametrize("name", NAMES)
def test_the_function_is_documented(name: str) -> None:
    function = getattr(perpeft, name)
    assert callable(function) and function.__doc__ and function.__module__ == api.__name__
