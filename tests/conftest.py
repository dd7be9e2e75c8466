"""Every test run keeps its caches (generated demo data, item inputs) in one temporary directory."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("perpeft-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("PERPEFT_CACHE", str(cache))
    yield cache
    patch.undo()
