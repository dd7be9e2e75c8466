"""Per-epoch training curves to TensorBoard (``train --log-dir``), beside ``state.json``: every stage's loss,
validation and test metrics and item-vector norms, one scalar per epoch on the run's epoch axis (a second
stage's epoch e at E1 + e, as `analyze curves` draws it). Needs the optional ``tensorboard`` package."""

from pathlib import Path

from perpeft.engine.errors import InputError
from perpeft.engine.runtime.records import EpochRecord


class TensorBoardLog:
    """Writes each finished epoch's record as ``STAGE/loss``, ``STAGE/valid/HR@30``, …,
    ``STAGE/norms/id``; a resumed run appends the epochs it trains to the same directory."""

    def __init__(self, log_dir: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def epoch(self, stage: str, step: int, record: EpochRecord) -> None:
        """Log one epoch's ``record`` (a ``state.json`` history entry) of ``stage`` at ``step``."""
        self.writer.add_scalar(f"{stage}/loss", record.loss, step)
        for group, scores in (("valid", record.valid), ("test", record.test), ("norms", record.norms or {})):
            for name, value in scores.items():
                self.writer.add_scalar(f"{stage}/{group}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def require_tensorboard() -> None:
    """InputError unless the tensorboard package is installed (checked before a run starts)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise InputError(
            '--log-dir writes TensorBoard events: install the tensorboard package (pip install -e ".[tensorboard]")'
        ) from None
