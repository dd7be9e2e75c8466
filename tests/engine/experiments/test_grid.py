"""The experiment runner: grids of cells × seeds, resumable, summarised like the paper's tables."""

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from scipy import stats

from perpeft.cli.main import cli
from perpeft.engine.analysis.attention import divergence
from perpeft.engine.config.methods import TABLE2_METHODS
from perpeft.engine.errors import InputError, RunError
from perpeft.engine.experiments import grid as experiment
from perpeft.engine.experiments.grid import Cell, Finished, build_grid, run_name
from perpeft.engine.experiments.runner import run_experiment
from perpeft.engine.experiments.tables import methods_table, paired_p_values
from perpeft.engine.runtime.run_directory import RunDirectory


def test_grid_runs_peft_free_methods_once_and_shares_identical_cells(small_config, small_demo: Path) -> None:
    cells = build_grid(["lora", "ia3"], list(TABLE2_METHODS), True, ["kmeans", "gmm"], [2, 4], True)
    methods = [cell for cell in cells if cell.section == "methods"]
    assert len(methods) == 2 + 6 * 2  # w/o MM and Frozen MM once, six methods per PEFT type
    assert {cell.peft for cell in methods if cell.row in ("wo-mm", "frozen-mm")} == {None}
    assert [cell.row for cell in cells if cell.section == "ablations"][-1] == "PerPEFT"
    base = small_config(small_demo)
    names = {run_name(cell.config(base, 0)) for cell in cells}
    # PerPEFT with LoRA and C = 2 (the small config's C) is in methods, ablations, clustering and groups.
    perpeft = [cell for cell in cells if run_name(cell.config(base, 0)) == "perpeft-lora-C2"]
    assert {cell.section for cell in perpeft} == {"methods", "ablations", "clustering", "groups", "scalability"}
    assert len(names) < len(cells)
    with pytest.raises(InputError, match="unknown"):
        build_grid(["lora"], ["magic"], False, [], [], False)
    with pytest.raises(InputError, match="nothing to run"):
        build_grid(["lora"], [], False, [], [], False)


def test_grid_writes_every_cell_and_seed_and_resumes(
    small_config, small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = small_config(small_demo, baseline=False)
    cells = build_grid(["lora"], ["wo-mm", "global-peft", "perpeft"], False, ["kmeans", "gmm"], [], True)
    lines: list[str] = []
    finished = run_experiment(base, cells, [0, 1], tmp_path, lines.append)
    assert len(lines) == 4 * 2  # wo-mm, global-peft, perpeft (= kmeans = scalability), gmm; two seeds
    assert "ETA" in lines[0]

    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert len(rows) == len(cells) * 2 == len(finished)
    perpeft_row = next(row for row in rows if row["section"] == "methods" and row["row"] == "perpeft")
    metrics = json.loads((tmp_path / perpeft_row["run"] / "metrics.json").read_text())
    assert float(perpeft_row["test_NDCG@20"]) == pytest.approx(metrics["perpeft"]["test"]["NDCG@20"], abs=1e-6)

    table = (tmp_path / "table.md").read_text()
    assert "| N/A | w/o MM |" in table and "| LoRA | Global PEFT |" in table and "| P-value |" in table
    assert "Scalability" in table and "**" in table
    assert "Settings: E1 = 1, E2 = 1 (single-stage methods train E1 + E2 epochs), lr 0.001," in table
    assert "C = 2 unless a row says otherwise" in table

    # Rerunning trains nothing; a removed run (an interrupted grid) is the only one trained again.
    trained: list[Path] = []
    original = experiment.train_new_run

    def counting(config, path, **kwargs):
        trained.append(path)
        return original(config, path, **kwargs)

    monkeypatch.setattr(experiment, "train_new_run", counting)
    again: list[str] = []
    run_experiment(base, cells, [0, 1], tmp_path, again.append)
    assert trained == [] and all("done earlier" in line for line in again)
    victim = tmp_path / "runs" / "global-peft-lora-C2" / "seed-1"
    for path in sorted(victim.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    victim.rmdir()
    run_experiment(base, cells, [0, 1], tmp_path, again.append)
    assert trained == [victim]

    with pytest.raises(InputError, match="another configuration"):
        run_experiment(small_config(small_demo, baseline=False, lr=5e-4), cells, [0], tmp_path, again.append)


def test_divergence_section_trains_reseeded_runs_once_and_writes_table_7(
    small_config, small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = small_config(small_demo, baseline=False)
    cells = build_grid(["lora"], [], False, [], [], False, divergence=True)
    assert [(cell.section, cell.peft) for cell in cells] == [("divergence", "lora")]
    lines: list[str] = []
    run_experiment(base, cells, [0, 1], tmp_path, lines.append)
    runs = tmp_path / "runs" / "perpeft-lora-C2"
    for seed in (0, 1):
        reseeded = RunDirectory.open(runs / f"seed-{seed}-reseed-{seed + 1}")
        assert (reseeded.config.seed, reseeded.config.global_seed) == (seed + 1, seed)
        grouping = (runs / f"seed-{seed}" / "grouping.safetensors").read_bytes()
        assert (reseeded.path / "grouping.safetensors").read_bytes() == grouping
    assert [line.split(":")[0] for line in lines[2:]] == [
        "reseeded perpeft-lora-C2 seed 0 → 1",
        "reseeded perpeft-lora-C2 seed 1 → 2",
    ]

    table = (tmp_path / "table.md").read_text().splitlines()
    start = next(index for index, line in enumerate(table) if line.startswith("### Table 7"))
    rows = [line.split(" | ") for line in table[start + 4 : start + 7]]
    assert [row[0] for row in rows] == ["| 0", "| 1", "| mean"]
    same = divergence(runs / "seed-0", runs / "seed-0-reseed-1", progress=False)
    across = divergence(runs / "seed-0", runs / "seed-1", progress=False)
    assert rows[0][1:4] == [f"{same['inter']:.5f}", f"{same['intra']:.5f}", "1"]
    assert rows[0][4:] == [f"{across['intra']:.5f}", f"{100 * across['matched_users']:.1f}% |"]

    trained: list[Path] = []
    original = experiment.train_new_run
    monkeypatch.setattr(experiment, "train_new_run", lambda *a, **k: trained.append(a[1]) or original(*a, **k))
    run_experiment(base, cells, [0, 1], tmp_path, lines.append)
    assert trained == []
    with pytest.raises(InputError, match="lora or ia3"):
        build_grid(["iisan"], [], False, [], [], False, divergence=True)


def test_table_2_lists_peft_blocks_in_the_papers_order() -> None:
    result = {"test": {"HR@20": 0.1, "HR@30": 0.2, "NDCG@20": 0.05, "NDCG@30": 0.06}}
    finished = [
        Finished(Cell("methods", method, peft, ()), 0, Path("."), {"result": "global", "global": result})
        for peft, method in (("iisan", "perpeft"), (None, "wo-mm"), ("ia3", "global-peft"), ("lora", "perpeft"))
    ]
    blocks = [
        line.split(" | ")[0] for line in methods_table(finished, "demo") if line.startswith("| ") and "---" not in line
    ]
    assert [block for block in blocks if block.strip("| ")] == ["| PEFT", "| N/A", "| LoRA", "| (IA)3", "| IISAN"]


def test_paired_t_test_pairs_runs_by_seed() -> None:
    def entry(row: str, seed: int, value: float) -> Finished:
        result = {"test": {"HR@20": value, "HR@30": value, "NDCG@20": value, "NDCG@30": value}}
        metrics = {"result": "perpeft", "perpeft": result, "method": "perpeft"}
        return Finished(Cell("clustering", row, "lora", ()), seed, Path("."), metrics)

    kmeans, gmm = [0.10, 0.12, 0.11], [0.11, 0.125, 0.118]
    finished = [entry("kmeans", seed, value) for seed, value in enumerate(kmeans)]
    finished += [entry("gmm", seed, value) for seed, value in enumerate(gmm)]
    expected = stats.ttest_rel([100 * v for v in kmeans], [100 * v for v in gmm]).pvalue
    assert paired_p_values(finished, "clustering", ("kmeans", "gmm"))["NDCG@20"] == pytest.approx(expected)


def test_experiment_cli_refuses_bad_requests_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    for arguments, expected in (
        (["--out", str(tmp_path)], "nothing to run"),
        (["--out", str(tmp_path), "--methods", "magic"], "unknown"),
        (["--out", str(tmp_path), "--methods", "all", "--peft", "lora,qlora"], "--peft"),
        (["--out", str(tmp_path), "--clustering", "dbscan"], "--clustering"),
    ):
        result = runner.invoke(cli, ["experiment", *arguments])
        assert result.exit_code == 2, result.output
        assert expected in result.output


def test_a_tuning_grid_trains_every_combination_and_reports_each_cell_at_its_best_validation(
    small_config, small_demo: Path, tmp_path: Path
) -> None:
    base = small_config(small_demo, baseline=False, train_windows="all")
    cells = build_grid(["lora"], ["wo-mm", "frozen-mm"], False, [], [], False)
    tuning = {"lr": [1e-3, 1e-2], "weight_decay": [1e-4], "id_lr": [5e-3], "epochs_perpeft": [1, 2]}
    lines: list[str] = []
    finished = run_experiment(base, cells, [0, 1], tmp_path, lines.append, tuning)
    assert len(finished) == len(lines) == 2 * 2 * 2 * 2  # cells × lr values × E2 values × seeds
    assert {entry.run.parent.name for entry in finished if entry.cell.row == "wo-mm"} == {
        f"wo-mm-none-C2-lr{lr}-e2{e2}" for lr in ("0.001", "0.01") for e2 in (1, 2)
    }
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert {row["weight_decay"] for row in rows} == {"0.0001"}  # one value: a setting, not a tuning axis
    table = (tmp_path / "table.md").read_text()
    assert {row["id_lr"] for row in rows} == {"0.005"}
    assert "lr tuned over {0.001, 0.01} (ID embeddings 0.005), weight decay 0.0001" in table
    assert "E2 = tuned over {1, 2}" in table
    assert "batch 16 (training windows: all), C = 2" in table
    for row in ("wo-mm", "frozen-mm"):
        mine = [entry for entry in rows if entry["row"] == row]
        means: dict[tuple[str, str], list[float]] = {}
        for entry in mine:
            means.setdefault((entry["lr"], entry["epochs_perpeft"]), []).append(float(entry["valid_HR@30"]))
        best = max(means, key=lambda key: sum(means[key]))
        assert {(entry["lr"], entry["epochs_perpeft"]) for entry in mine if entry["selected"] == "1"} == {best}
        assert f"| methods | {row} | N/A | {float(best[0]):g} | {best[1]} |" in table
        reported = [float(entry["test_NDCG@20"]) for entry in mine if entry["selected"] == "1"]
        title = {"wo-mm": "w/o MM", "frozen-mm": "Frozen MM"}[row]
        line = next(
            line for line in table.splitlines() if line.startswith(f"| N/A | {title} |") or f"| {title} |" in line
        )
        mean = 100 * sum(reported) / 2
        assert f"{mean:.2f}" in line


def test_the_id_rate_is_a_tuning_axis_and_an_unset_one_stays_blank(small_config, small_demo: Path, tmp_path) -> None:
    cells = build_grid(["lora"], ["wo-mm"], False, [], [], False)
    finished = run_experiment(
        small_config(small_demo), cells, [0], tmp_path / "tuned", lambda line: None, {"id_lr": [1e-3, 1e-2]}
    )
    assert {entry.run.parent.name for entry in finished} == {"wo-mm-none-C2-idlr0.001", "wo-mm-none-C2-idlr0.01"}
    assert "lr 0.001 (ID embeddings tuned over {0.001, 0.01})," in (tmp_path / "tuned" / "table.md").read_text()
    run_experiment(small_config(small_demo), cells, [0], tmp_path / "plain", lambda line: None)
    (row,) = csv.DictReader(io.StringIO((tmp_path / "plain" / "results.csv").read_text()))
    assert row["id_lr"] == "" and row["lr"] == "0.001" and row["selected"] == "1"


def test_a_failed_run_is_recorded_the_grid_goes_on_and_a_rerun_retries_it(
    small_config, small_demo: Path, tmp_path
) -> None:
    cells = build_grid(["lora"], ["global-peft"], False, [], [], False)
    base, lines = small_config(small_demo, baseline=False), []
    with pytest.raises(RunError, match=r"1 of 2 runs failed \(listed with their reasons in table.md and results.csv\)"):
        run_experiment(base, cells, [0], tmp_path, lines.append, {"lr": [1e-3, 1e4]})  # 1e4 diverges
    failures = [line for line in lines if "FAILED: " in line]
    assert len(failures) == 1 and "lr10000" in failures[0] and "training diverged in Global PEFT" in failures[0]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert sorted(row["lr"] for row in rows) == ["0.001", "10000"]
    failed, done = sorted(rows, key=lambda row: row["error"] == "")
    assert "training diverged" in failed["error"] and failed["test_HR@30"] == "" and failed["selected"] == "0"
    assert done["error"] == "" and float(done["test_HR@30"]) > 0 and done["selected"] == "1"
    table = (tmp_path / "table.md").read_text()
    assert "### Failed runs (1)" in table and f"`{failed['run']}` | training diverged" in table
    assert "Global PEFT" in table.split("### Table 2")[1]  # the finished run still makes its table
    again: list[str] = []
    with pytest.raises(RunError, match="1 of 2 runs failed"):
        run_experiment(base, cells, [0], tmp_path, again.append, {"lr": [1e-3, 1e4]})
    assert any("done earlier" in line for line in again) and any("FAILED: " in line for line in again)
