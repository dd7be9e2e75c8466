"""`perpeft-engine serve`: refuses a run it cannot serve before listening; a real process answers."""

import json
import shutil
import sys
import urllib.request

import pytest
from click.testing import CliRunner

from benchmarks.serve_load import free_port, start_server
from perpeft.cli.main import cli
from perpeft.engine.runtime.run_directory import EMBEDDINGS, RunDirectory
from perpeft.engine.runtime.tensors import load_tensors, save_tensors


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_refuses_a_run_without_embeddings(demo_run, tmp_path, assert_one_line_error):
    copy = shutil.copytree(demo_run, tmp_path / "run", ignore=shutil.ignore_patterns(EMBEDDINGS))
    assert_one_line_error(invoke("serve", "--run", str(copy), "--port", "0"), "no embeddings", "perpeft-engine embed")


def test_refuses_tables_that_do_not_match_the_config(embedded_run, tmp_path, assert_one_line_error):
    copy = shutil.copytree(embedded_run, tmp_path / "run")
    run = RunDirectory(copy)
    users = load_tensors(run.embedded_users)[0]
    save_tensors(run.embedded_users, {**users, "centroids": users["centroids"][:, :5]})
    assert_one_line_error(
        invoke("serve", "--run", str(copy), "--port", "0"), "users.safetensors: centroids is [2, 5]", "--overwrite"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_served_run_answers_over_http(embedded_run, workers):
    port = free_port()
    server = start_server(embedded_run, port, threads=1, workers=workers)  # returns once /ready answers
    base = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
            ready = json.load(response)
        assert ready["ready"] and ready["groups"] == 2
        request = urllib.request.Request(
            f"{base}/recommend", data=json.dumps({"user": "u00004", "k": 3}).encode(), method="POST"
        )
        request.add_header("content-type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
        assert len(answer["items"]) == 3 and answer["assigned_by"] == "known_user"
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}" in stderr


def test_says_which_extra_is_missing(embedded_run, monkeypatch, assert_one_line_error):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert_one_line_error(invoke("serve", "--run", str(embedded_run)), "uvicorn is not installed", '".[serve]"')
