"""Grids of runs over methods, PEFT types, ablations and seeds, and the paper's tables from their results."""
