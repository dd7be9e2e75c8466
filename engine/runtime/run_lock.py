"""One writer per run directory: `train`, `--resume`, `embed`, `embed --add-items` and `experiment` hold this
lock while they write; readers (`serve`, `evaluate`, `recommend`, `analyze`) need none.

The lock is an advisory ``flock`` on ``RUN/.lock``, which also records its holder (host, pid, command,
start time) for the refusal message. The operating system releases the lock when its process dies, however
it dies, so a lock left by a killed writer is simply free: the next writer takes it and says whose record
it found. Under ``torchrun`` rank 0 alone takes it.
"""

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from perpeft.engine.errors import InputError
from perpeft.engine.runtime.distributed import current_world

LOCK = ".lock"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def holding_run_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s writer lock (creating the directory) for the ``with`` block; InputError naming
    the holder when another process holds it. Ranks other than 0 of a process group take none."""
    if not current_world().is_main:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{directory}: in use by {_describe(_holder(handle))}: one writer at a time (train, --resume, "
                "embed, experiment); wait for it to end or stop it"
            ) from None
        left = _holder(handle)
        if left:
            log.warning(
                "warning: %s: took over the lock left by %s, which ended without releasing it",
                directory,
                _describe(left),
            )
        _write_holder(
            handle, {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "command": _command()}
        )
        try:
            yield
        finally:
            _write_holder(handle, None)  # a clean release leaves no record to take over
    finally:
        os.close(handle)  # releases the flock


def _command() -> str:
    return " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:200]


def _holder(handle: int) -> dict[str, object] | None:
    """The record in the lock file, None when it is empty or unreadable (a writer killed while writing it)."""
    try:
        record = json.loads(os.pread(handle, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_holder(handle: int, record: dict[str, object] | None) -> None:
    os.ftruncate(handle, 0)
    if record is not None:
        os.pwrite(handle, json.dumps(record).encode(), 0)


def _describe(holder: dict[str, object] | None) -> str:
    if not holder:
        return "another process"
    since = holder.get("since")
    age = ""
    if isinstance(since, int | float):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        age = f" since {started} ({_duration(time.time() - since)} ago)"
    return f"pid {holder.get('pid')} on {holder.get('host')} (`{holder.get('command')}`){age}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
