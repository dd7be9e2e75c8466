"""The HTTP recommendation service (`perpeft-engine serve`): an ASGI app over a run's cached tables."""
