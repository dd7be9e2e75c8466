"""Reading a finished run's ``metrics.json``: which stage is the method's result, which rows a report shows,
and how far recomputed metrics are from the recorded ones. The CLI only formats what these return."""

from typing import Any

from perpeft.engine.config.methods import METHODS
from perpeft.engine.eval.metrics import SELECTION_METRIC
from perpeft.engine.runtime.records import STAGE_TITLES


def result_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The stage summary that is the method's result (PerPEFT's second stage, else Global)."""
    return metrics[metrics["result"]]


def result_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(label, test metrics) rows of a run's report: the method's result, or for PerPEFT its Global PEFT
    (the E1+E2 baseline, or stage 1 without one) and PerPEFT, in that order."""
    method = METHODS[metrics["method"]]
    if not method.grouped_adapters:
        return [(method.title, result_metrics(metrics)["test"])]
    label = "Global PEFT" if metrics["global"].get("model") == "baseline" else "Global PEFT (stage 1)"
    return [(label, metrics["global"]["test"]), ("PerPEFT", metrics["perpeft"]["test"])]


def still_improving(metrics: dict[str, Any]) -> list[str]:
    """One warning per stage whose best validation epoch is its last: the model was still improving when the
    stage stopped, so its result depends on the epoch count. Each names the option that lengthens it."""
    method = METHODS[metrics["method"]]
    warnings = []
    for stage in (name for name in STAGE_TITLES if name in metrics):
        summary = metrics[stage]
        if summary["epochs"] < 2 or summary["best_epoch"] != summary["epochs"]:
            continue
        if stage != "global":
            raise_option = "--epochs-perpeft (E2)"
        elif method.two_stage and summary.get("model") == "stage1":
            raise_option = "--epochs-global (E1, the epochs before grouping)"
        else:
            raise_option = "--epochs-global or --epochs-perpeft (this stage trains E1 + E2 epochs)"
        warnings.append(
            f"{STAGE_TITLES[stage]}'s best validation {SELECTION_METRIC} is at its last epoch "
            f"({summary['epochs']}): still improving; raise {raise_option} or --lr"
        )
    return warnings


def relative_change(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """``after / before - 1`` per metric (None where ``before`` is 0)."""
    return {name: (after[name] / before[name] - 1) if before[name] else None for name in after}


def largest_difference(metrics: dict[str, dict[str, float]], recorded: dict[str, Any]) -> float:
    """The largest absolute difference between recomputed ``{stage: {metric: value}}`` and a recorded stage
    summary."""
    return max(abs(value - recorded[stage][name]) for stage in metrics for name, value in metrics[stage].items())
