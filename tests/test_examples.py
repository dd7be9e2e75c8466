"""The notebook-style example runs end to end on the demo through the public API alone."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_runs_the_whole_path(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    assert float(lines["largest difference from training's metrics"]) < 1e-5
    assert lines["item tables"].strip().startswith("(2, ")
    assert lines["exported"].strip() == "LORA"
    assert {line.split()[0] for line in done.stdout.splitlines()} >= {"global-peft", "perpeft"}
    assert (tmp_path / "grid" / "table.md").is_file() and (tmp_path / "adapter-0" / "adapter_config.json").is_file()


def test_the_api_is_what_perpeft_exports() -> None:
    import perpeft
    from perpeft.engine import api

    assert sorted(name for name in perpeft.__all__ if name != "__version__") == sorted(api.__all__)
    assert all(getattr(perpeft, name) is getattr(api, name) for name in api.__all__)
