"""Turn a ``--data`` value into a ``Dataset``: the built-in demo or a dataset directory."""

from pathlib import Path

from ..cache import cache_root
from ..errors import InputError
from .dataset import Dataset
from .demo import generate_demo
from .formats import load_recbole

DEMO = "demo"


def demo_directory(seed: int) -> Path:
    """Where the demo generated from ``seed`` lives (created on first use, then reused)."""
    return cache_root() / "demo" / f"seed-{seed}" / DEMO


def load_dataset(data: str, seed: int) -> Dataset:
    """``demo`` (generated deterministically from ``seed``) or a RecBole-style dataset directory."""
    if data == DEMO:
        directory = demo_directory(seed)
        if not (directory / f"{DEMO}.inter").is_file():
            generate_demo(directory, seed)
        return load_recbole(directory)
    path = Path(data).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such dataset directory (use --data demo or a RecBole-style directory)")
    return load_recbole(path)
