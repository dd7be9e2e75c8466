"""Where the engine keeps what it derives once and reuses: input caches and generated demo data."""

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


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


def discard_damaged(directory: Path, reason: str) -> None:
    """Delete a cache directory that failed its checks (cut short, another shape), saying so in one line, so
    that the caller builds it again."""
    log.warning("warning: %s: damaged cache (%s); building it again", directory, reason)
    shutil.rmtree(directory, ignore_errors=True)
