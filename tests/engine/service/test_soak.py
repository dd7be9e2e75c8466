"""The soak benchmark (`benchmarks/serve_soak.py`) cannot rot: a few seconds of it against a real service,
catalog updates published by a second process while it runs, every answer a 200 (no timing asserted)."""

import json
from pathlib import Path

from benchmarks import serve_soak


def test_a_short_soak_with_a_catalog_update(embedded_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    arguments = ["--run", str(embedded_run), "--minutes", "0.15", "--window", "3", "--update-every", "3"]
    serve_soak.main([*arguments, "--items-per-update", "2", "--rss-slack-mib", "1000", "--out", str(out)])
    result = json.loads(out.read_text())
    statuses = [update["exit_status"] for update in result["updates"]]
    assert statuses and set(statuses) == {0}  # how many fit in the soak depends on the machine's speed
    windows = result["windows"]
    assert len(windows) == 3 and all(
        window["requests"] > 0 and window["requests"] == window["ok"] for window in windows
    )
    assert result["verdicts"]["no_5xx"] and result["verdicts"]["five_xx"] == 0
    assert windows[0]["catalog_version"] == 0 and all(window["rss_mib"] > 0 for window in windows)
