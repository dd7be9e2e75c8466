"""Atomic writes: a temporary file or directory beside the target, complete before it is renamed over it.

Temporaries are created with the modes any program asks for (0666 files, 0777 directories), so the
process's umask decides what the renamed result allows, as for every other file a user writes (0644 and
0755 under the usual 022); ``tempfile``'s private 0600/0700 would outlive the rename.
"""

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")


def temporary_file_beside(path: Path) -> Path:
    """A new empty file beside ``path`` (same filesystem, so renaming it over ``path`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = _temporary_name(path)
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def temporary_directory_beside(path: Path) -> Path:
    """A new empty directory beside ``path`` (same filesystem, so renaming it onto ``path`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = _temporary_name(path)
        try:
            temporary.mkdir(0o777)
            return temporary
        except FileExistsError:
            continue


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over ``path``."""
    temporary = temporary_file_beside(path)
    try:
        with temporary.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def replace_directory(new: Path, target: Path) -> None:
    """Rename the complete directory ``new`` onto ``target``; an existing ``target`` is moved aside first
    (a directory cannot be renamed over a non-empty one) and deleted once ``new`` is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = temporary_directory_beside(target)
    os.replace(target, aside / target.name)
    os.replace(new, target)
    shutil.rmtree(aside)
