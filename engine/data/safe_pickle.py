"""Read pickles that may hold only plain data; no class, function or reduce call is ever resolved.

`pickle.load` runs whatever callables a file names, so a shared dataset file could run code. The
unpickler here refuses every global lookup (``find_class``) and persistent id, which leaves only the
opcodes that build built-in containers and scalars; the result is then walked so that anything but
dict, list, tuple, str, int, float, bool and None (a set, bytes, ...) is refused as well.
"""

import pickle
from pathlib import Path
from typing import Any

from perpeft.engine.errors import InputError

PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))
_ADMITTED = "only dict, list, tuple, str, int, float, bool and None are admitted"


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses a persistent id")


def load_plain_pickle(path: Path) -> Any:
    """The plain value pickled in ``path``; `InputError` naming the file for anything else."""
    try:
        with path.open("rb") as stream:
            value = _PlainUnpickler(stream).load()
    except FileNotFoundError as error:
        raise InputError(f"{path}: pickle file not found") from error
    except IsADirectoryError as error:
        raise InputError(f"{path}: is a directory, not a pickle file") from error
    # A hostile or damaged pickle can fail in many ways (stack errors, bad opcodes, deep nesting): all are bad input.
    except Exception as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"{path}: refused pickle ({reason}); {_ADMITTED}") from error
    _check_plain(path, value)
    return value


def _check_plain(path: Path, value: Any) -> None:
    """Walk ``value`` (iteratively, each container once: pickles may share or nest them) for non-plain types."""
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if type(current) not in PLAIN_TYPES:
            raise InputError(f"{path}: refused pickle (it holds a {type(current).__name__}); {_ADMITTED}")
        if isinstance(current, (dict, list, tuple)) and id(current) not in seen:
            seen.add(id(current))
            if isinstance(current, dict):
                stack.extend(current.keys())
                stack.extend(current.values())
            else:
                stack.extend(current)
