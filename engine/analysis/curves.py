"""Per-epoch training curves of a run, from its ``state.json``: the loss and every validation and test
metric of each stage, as a PNG (`analyze curves`)."""

from io import BytesIO
from pathlib import Path

from perpeft.engine.analysis import refuse_existing
from perpeft.engine.errors import InputError
from perpeft.engine.eval.metrics import KS, SELECTION_METRIC
from perpeft.engine.runtime.atomic import atomic_write_bytes
from perpeft.engine.runtime.records import STAGE_TITLES, EpochRecord
from perpeft.engine.runtime.run_directory import RunDirectory


def stage_curves(run: RunDirectory) -> dict[str, tuple[list[int], list[EpochRecord]]]:
    """Each trained stage's (epochs on the run's axis, per-epoch records): a second stage starts from the
    Global stage's epoch-E1 snapshot, so its epoch e is drawn at E1 + e."""
    state = run.read_state()
    config = run.config
    curves: dict[str, tuple[list[int], list[EpochRecord]]] = {}
    for name in STAGE_TITLES:
        history = state.stage(name).history if name in state.stages else []
        if history:
            offset = 0 if name == "global" else config.epochs_global
            curves[name] = ([offset + record.epoch for record in history], history)
    if not curves:
        raise InputError(f"{run.path}: no epoch finished yet; nothing to draw")
    return curves


def curves_png(run: RunDirectory) -> bytes:
    """Loss, HR@K and NDCG@K (validation solid, test dashed, a colour per K, a marker per stage) and the
    item vectors' term norms per epoch of every stage, each stage's best epoch by validation
    `SELECTION_METRIC` marked. Needs matplotlib (``pip install perpeft-engine[plot]``)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("writing a PNG needs matplotlib: install perpeft-engine[plot]") from None
    curves = stage_curves(run)
    figure = Figure(figsize=(17, 3.8), layout="constrained")
    loss_axes, *metric_axes, norm_axes = figure.subplots(1, 4)
    colours = dict(zip(KS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for index, (name, (epochs, history)) in enumerate(curves.items()):
        marker = "os^"[index]
        loss_axes.plot(epochs, [record.loss for record in history], marker=marker, ms=3, label=STAGE_TITLES[name])
        best = max(range(len(history)), key=lambda position: history[position].valid[SELECTION_METRIC])
        scores = {"valid": [record.valid for record in history], "test": [record.test for record in history]}
        for axes, metric in zip(metric_axes, ("HR", "NDCG"), strict=True):
            for k in KS:
                for split, style in (("valid", "-"), ("test", "--")):
                    values = [epoch[f"{metric}@{k}"] for epoch in scores[split]]
                    label = f"{split} {metric}@{k}" if index == 0 else None  # stages: the loss panel's legend
                    axes.plot(epochs, values, style, color=colours[k], marker=marker, ms=2, label=label)
            axes.axvline(epochs[best], color="grey", lw=0.8, ls=":")
        norms = [record.norms for record in history if record.norms is not None]
        if len(norms) == len(history):  # runs trained before the norms were recorded lack them
            for term, colour in (("multimodal", "tab:purple"), ("id", "tab:brown")):
                label = {"multimodal": "‖0.5·MLP(m)‖", "id": "‖h‖"}[term] if index == 0 else None
                values = [epoch[term] for epoch in norms]
                norm_axes.plot(epochs, values, color=colour, marker=marker, ms=3, label=label)
    loss_axes.set(title="training loss", xlabel="epoch")
    loss_axes.legend(fontsize=7)
    for axes, metric in zip(metric_axes, ("HR", "NDCG"), strict=True):
        axes.set(title=f"{metric}@K (valid solid, test dashed; dotted: best epoch by valid {SELECTION_METRIC})")
        axes.title.set_fontsize(8)
        axes.set_xlabel("epoch")
        axes.legend(fontsize=6, ncol=2)
    norm_axes.set(title="item-vector terms, z = 0.5·MLP(m) + h (mean norm)", xlabel="epoch")
    norm_axes.title.set_fontsize(8)
    if norm_axes.lines:
        norm_axes.legend(fontsize=7)
    config = run.config
    figure.suptitle(f"{run.path.name}: {config.method} on {config.data}", fontsize=10)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_curves(run: RunDirectory, png: Path, overwrite: bool) -> None:
    """Write `curves_png` to ``png`` atomically, refusing an existing file unless ``overwrite``."""
    refuse_existing(png, overwrite)
    atomic_write_bytes(png, curves_png(run))
