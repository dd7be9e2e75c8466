"""The bounded load test (`benchmarks/serve_load.py`) against a real service on 127.0.0.1: a fixed
request count per cell, every answer a 200, the figures well formed (no timing is asserted)."""

from benchmarks.serve_load import markdown, run_load


def test_bounded_load_on_loopback(embedded_run):
    result = run_load(embedded_run, clients=[1, 4], requests=40, max_seconds=60, warmup=5)
    cells = {(cell["kind"], cell["clients"]): cell for cell in result["cells"]}
    assert set(cells) == {(kind, clients) for kind in ("known_user", "new_user") for clients in (1, 4)}
    for cell in cells.values():
        assert cell["requests"] == 40 and cell["non_200"] == 0
        assert 0 < cell["p50_ms"] <= cell["p99_ms"] and cell["throughput_rps"] > 0
    assert result["ready"]["groups"] == 2
    assert markdown(result).count("\n") == 5
