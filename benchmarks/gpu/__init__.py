"""The prepared GPU check's steps (``benchmarks/gpu_check.sh`` runs each as ``python -m benchmarks.gpu.NAME``).

Each step module writes one JSON file of figures, every figure tagged with the device it ran on, and
exits non-zero when its check fails; `report` gathers them into ``gpu-check.json`` and ``gpu-check.md``.
Every step also has a ``--smoke`` mode (CPU, tiny random CLIP, seconds) that only proves its code path
runs: smoke figures are never GPU figures.
"""

SMOKE_NOTE = "smoke run (CPU, tiny random CLIP): proves the code path only, not a GPU figure"
