"""The prepared GPU check's steps (``benchmarks/gpu_check.sh`` runs each as ``python -m benchmarks.gpu.NAME``).

Each step module writes one JSON file of figures (`figures.Figures`, saved after every figure), every figure
tagged with the device it ran on, and exits non-zero when its check fails; the pytest steps write one JSON
line per finished test (`pytest_lines`); `report` gathers them into ``gpu-check.json`` and ``gpu-check.md``.
Every step also has a ``--smoke`` mode (CPU, tiny random CLIP, seconds) that only proves its code path
runs: smoke figures are never GPU figures.
"""

SMOKE_NOTE = "smoke run (CPU, tiny random CLIP): proves the code path only, not a GPU figure"
