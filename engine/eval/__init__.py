"""Scoring users: full-ranking metrics, per-epoch evaluation, user vectors in the grouping space."""
