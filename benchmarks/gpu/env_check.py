"""The GPU check's first step: is there a CUDA GPU, and what are the machine and the software.

``--cuda-only``: exit 2 with one line when torch is missing or sees no CUDA GPU (the script's gate,
before anything expensive); else print the number of CUDA devices (the script runs the 2-rank NCCL step
when there are two or more) and exit 0. Otherwise also record the device (name, capability, memory, driver, MIG mode
from nvidia-smi), CPU count and the versions of Python, torch, CUDA, cuDNN, NCCL, Triton, transformers,
pytest and pytest-benchmark into ``env.json``; exit 1 when a package the check needs is missing.
Imports nothing of the engine, so it runs before the project is installed.
"""

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

NEEDS_CUDA = "gpu_check: needs a CUDA GPU"
PACKAGES = ("torch", "triton", "transformers", "numpy", "scikit-learn", "pytest", "pytest-benchmark")
NVIDIA_SMI_FIELDS = "name,driver_version,memory.total,mig.mode.current,clocks.max.sm,power.limit"


def cuda_problem() -> str | None:
    """Why there is no usable CUDA GPU (one line), or None when torch sees one."""
    try:
        import torch
    except ImportError as error:
        return f"{NEEDS_CUDA} and torch with CUDA; torch cannot be imported ({error})"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"{NEEDS_CUDA}; torch {torch.__version__} ({build}) sees none. Nothing was run."
    return None


def nvidia_smi() -> dict[str, str] | str:
    """The GPU's nvidia-smi fields, or why they could not be read."""
    try:
        query = ["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"]
        line = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as error:
        return f"unavailable ({type(error).__name__})"
    return dict(zip(NVIDIA_SMI_FIELDS.split(","), (value.strip() for value in line.split(",")), strict=False))


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment() -> dict[str, Any]:
    """Everything the results file records about the machine (CUDA present)."""
    import torch

    properties = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
    return {
        "device": torch.cuda.get_device_name(0),
        "device_count": torch.cuda.device_count(),
        "capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "multiprocessors": properties.multi_processor_count,
        "nvidia_smi": nvidia_smi(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "versions": versions(),
        "environment": {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-only", action="store_true", help="Only check that a CUDA GPU is usable.")
    parser.add_argument("--out", type=Path, default=None, help="Write env.json here.")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: record the versions, need no GPU.")
    args = parser.parse_args(argv)
    if args.smoke:
        record = {
            "device": "cpu (smoke)",
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "versions": versions(),
        }
        return write(record, args.out)
    problem = cuda_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    if args.cuda_only:
        import torch

        print(torch.cuda.device_count())
        return 0
    return write(environment(), args.out)


def write(record: dict[str, Any], out: Path | None) -> int:
    """Print and write ``record``; status 1 when a needed package is missing."""
    missing = [name for name, version in record["versions"].items() if version is None]
    record["missing"] = missing
    for key, value in record.items():
        if key not in ("versions", "missing"):
            print(f"{key}: {value}")
    print("versions: " + ", ".join(f"{name} {version}" for name, version in record["versions"].items()))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        temporary.replace(out)  # atomically: the report may read it at any moment
    if missing:
        print(f"missing packages: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
