"""Where the engine keeps what it derives once and reuses: input caches and generated demo data."""

import os
import shutil
from pathlib import Path


def cache_root() -> Path:
    """``$PERPEFT_CACHE``, else ``~/.cache/perpeft-engine``."""
    configured = os.environ.get("PERPEFT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "perpeft-engine"


def publish_directory(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` directory to ``final`` atomically (a concurrent winner is kept)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
