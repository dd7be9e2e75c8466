"""Datasets in, a `Dataset` (catalog + chronological user sequences) out."""
