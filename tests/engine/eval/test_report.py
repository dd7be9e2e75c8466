"""A finished run's report rows: the method's result stage, PerPEFT beside its Global PEFT, the change."""

import pytest

from perpeft.engine.eval.report import largest_difference, relative_change, result_metrics, result_rows, still_improving


def summary(ndcg: float) -> dict:
    return {"best_epoch": 3, "valid": {"NDCG@20": ndcg}, "test": {"NDCG@20": ndcg, "HR@20": 2 * ndcg}}


def test_perpeft_reports_its_global_stage_then_perpeft() -> None:
    metrics = {
        "method": "perpeft",
        "result": "perpeft",
        "global": {**summary(0.1), "model": "stage1"},
        "perpeft": summary(0.15),
    }
    assert result_metrics(metrics) is metrics["perpeft"]
    rows = result_rows(metrics)
    assert [label for label, _ in rows] == ["Global PEFT (stage 1)", "PerPEFT"]
    metrics["global"]["model"] = "baseline"
    assert result_rows(metrics)[0][0] == "Global PEFT"
    assert relative_change(rows[0][1], rows[1][1])["NDCG@20"] == pytest.approx(0.5)


def test_single_stage_and_group_level_methods_report_their_result_stage() -> None:
    assert result_rows({"method": "frozen-mm", "result": "global", "global": summary(0.09)}) == [
        ("Frozen MM", summary(0.09)["test"])
    ]
    group_level = {"method": "group-level-1", "result": "grouped", "global": summary(0.1), "grouped": summary(0.12)}
    assert result_rows(group_level) == [("Group-level 1", summary(0.12)["test"])]


def test_a_zero_baseline_has_no_relative_change_and_differences_take_the_largest() -> None:
    assert relative_change({"HR@20": 0.0}, {"HR@20": 0.3}) == {"HR@20": None}
    recorded = {"valid": {"HR@20": 0.5}, "test": {"HR@20": 0.25}}
    assert largest_difference({"valid": {"HR@20": 0.5}, "test": {"HR@20": 0.2}}, recorded) == pytest.approx(0.05)


def stage(best: int, epochs: int, **extra: str) -> dict:
    return {**summary(0.1), "best_epoch": best, "epochs": epochs, **extra}


def test_a_stage_whose_best_epoch_is_its_last_is_still_improving_and_names_the_option() -> None:
    single = {"method": "wo-mm", "result": "global", "global": stage(30, 30)}
    (warning,) = still_improving(single)
    assert warning == (
        "Global PEFT's best validation HR@30 is at its last epoch (30): still improving; raise --epochs-global or"
        " --epochs-perpeft (this stage trains E1 + E2 epochs) or --lr"
    )
    assert still_improving({**single, "global": stage(29, 30)}) == []
    assert still_improving({**single, "global": stage(1, 1)}) == []  # one epoch says nothing
    two_stage = {
        "method": "perpeft",
        "result": "perpeft",
        "global": stage(10, 10, model="stage1"),
        "perpeft": stage(20, 20),
    }
    first, second = still_improving(two_stage)
    assert "raise --epochs-global (E1, the epochs before grouping)" in first
    assert second.startswith("PerPEFT's best") and "raise --epochs-perpeft (E2)" in second
    assert still_improving({**two_stage, "global": stage(30, 30, model="baseline"), "perpeft": stage(3, 20)}) == [
        still_improving(single)[0]
    ]
