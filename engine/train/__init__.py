"""Training: the stage loop, the two-stage pipeline, grouping users, reseeded runs. Only the CLI and the
experiment runner import this package."""
