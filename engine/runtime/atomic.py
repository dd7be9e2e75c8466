"""Our own files: atomic writes (a temporary file or directory beside the target, complete and fsynced
before it is renamed over it) and checked JSON reads.

A write that fails (a full disk, any ``OSError``) removes its temporary, leaves the target as it was and
raises `RunError` naming the target and the operating system's reason.

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

from perpeft.engine.errors import InputError, RunError


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


def write_failed(path: Path, error: OSError) -> RunError:
    """The one-line error of a write to ``path`` that the operating system refused."""
    return RunError(f"{path}: cannot write ({error.strerror or error}); what was there is intact")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over ``path``."""
    try:
        temporary = temporary_file_beside(path)
    except OSError as error:
        raise write_failed(path, error) from None
    try:
        with temporary.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise write_failed(path, error) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; InputError naming the file when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise InputError(f"{path}: damaged or unreadable ({reason})") from None


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
