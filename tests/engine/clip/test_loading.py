"""`load_clip`: the engine's CLIP runs torch's layers, never kernels swapped in from the Hub."""

import pytest

from perpeft.engine.clip.loading import load_clip


def test_hub_kernels_are_off_and_mode_switches_never_kernelize(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers_kernels = pytest.importorskip("transformers.integrations.hub_kernels")
    calls = []
    monkeypatch.setattr(transformers_kernels, "kernelize", lambda *args, **kwargs: calls.append(kwargs))
    model = load_clip("tiny").model
    assert not getattr(model, "use_kernels", False)
    model.train()
    model.eval()
    assert not calls
