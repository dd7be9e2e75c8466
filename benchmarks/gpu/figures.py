"""What every step writes as it goes, without importing torch: its figures (`Figures`), saved atomically
after each one, and a stack dump when its time limit's SIGTERM arrives (`dump_stacks_on_term`).

A step killed at any moment thus leaves ``steps/NAME.json`` with every figure measured so far (``complete``
false) and, in its log, the Python stack of every thread at the kill: where it hung.
"""

import argparse
import faulthandler
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import SMOKE_NOTE


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a reader (the report,
    run after every step and every few seconds) never sees a torn file, and a kill leaves the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def dump_stacks_on_term() -> None:
    """On SIGTERM (the step's ``timeout``), print every thread's Python stack to stderr (the step's log),
    then terminate as before (``chain``)."""
    if hasattr(faulthandler, "register"):  # not on Windows
        faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)


def device_label(device: Any) -> str:
    """What every figure names: a string as given, or a torch device's GPU name (``cpu (smoke)`` on the CPU)."""
    if isinstance(device, str):
        return device
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"


class Figures:
    """One step's figures, each tagged with the device, saved as JSON for `report` after every change (a
    step killed by its timeout keeps what it measured; ``complete`` is set only by `finish`)."""

    def __init__(self, step: str, device: Any, smoke: bool, path: Path | None) -> None:
        self.step = step
        self.device = device_label(device)
        self.smoke = smoke
        self.path = path
        self.figures: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        self.ok = True
        self.complete = False
        self.save()

    def add(self, name: str, value: Any, unit: str = "", note: str = "") -> None:
        """Record a figure, print it as one line, save."""
        if isinstance(value, float):
            value = round(value, 6)
        print(f"[{self.step}] {name}: {value} {unit}  ({self.device}){'  - ' + note if note else ''}", flush=True)
        if self.smoke:
            note = f"{note}; {SMOKE_NOTE}" if note else SMOKE_NOTE
        self.figures.append({"name": name, "value": value, "unit": unit, "device": self.device, "note": note})
        self.save()

    def fail(self, reason: str) -> None:
        """Mark the step failed (its module then exits 1), keeping the figures gathered so far."""
        self.ok = False
        self.details.setdefault("failures", []).append(reason)
        print(f"[{self.step}] FAILED: {reason}", flush=True)
        self.save()

    def save(self) -> None:
        """Write the JSON atomically (when the step has a path)."""
        if self.path is None:
            return
        record = {
            "step": self.step,
            "device": self.device,
            "smoke": self.smoke,
            "ok": self.ok,
            "complete": self.complete,
            "figures": self.figures,
            "details": self.details,
        }
        write_atomic(self.path, json.dumps(record, indent=2, default=str) + "\n")

    def finish(self) -> int:
        """Save as complete and return the step's exit status."""
        self.complete = True
        self.save()
        return 0 if self.ok else 1


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options every step takes: ``--out`` (its JSON) and ``--smoke``. Called first by every step's
    ``main``, so it also makes the step print its threads' stacks when its timeout's SIGTERM arrives."""
    dump_stacks_on_term()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None, help="Write the step's figures to this JSON file.")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny random CLIP: prove the code path only.")
    return parser
