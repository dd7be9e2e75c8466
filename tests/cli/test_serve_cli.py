"""`perpeft-engine serve`: refuses a run it cannot serve before listening; a real process answers."""

import json
import shutil
import sys
import threading
import time
import urllib.error
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
        for _ in range(6):
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.load(response)
        assert len(answer["items"]) == 3 and answer["assigned_by"] == "known_user"
        time.sleep(1.5)  # the other workers publish their figures once a second
        for _ in range(3):  # whichever process answers the scrape counts every process's requests
            with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
                text = response.read().decode()
            assert 'perpeft_requests_total{route="/recommend",method="POST",status="200"} 6' in text
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}" in stderr


def test_says_which_extra_is_missing(embedded_run, monkeypatch, assert_one_line_error):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert_one_line_error(invoke("serve", "--run", str(embedded_run)), "uvicorn is not installed", '".[serve]"')


def test_a_running_service_picks_up_added_items_while_it_answers(embedded_copy, tmp_path, item_copies):
    run = embedded_copy
    item_file, ids = item_copies(run, tmp_path / "new", [3, 4])
    port = free_port()
    server = start_server(run, port, threads=1)  # looks for a new catalog every 2 s (serve's default)
    base = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    done = threading.Event()

    def ask() -> None:  # known-user requests all along the addition and the swap
        body = json.dumps({"user": "u00004", "k": 5}).encode()
        while not done.is_set():
            request = urllib.request.Request(f"{base}/recommend", data=body, method="POST")
            request.add_header("content-type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        assert invoke("embed", "--run", str(run), "--add-items", str(item_file), "--quiet").exit_code == 0
        deadline = time.monotonic() + 60
        while get_json(f"{base}/ready")["catalog_version"] != 1:
            assert time.monotonic() < deadline, "the service did not take in catalog version 1 in 60 s"
            time.sleep(0.2)
        assert get_json(f"{base}/items/{ids[1]}")["item"] == ids[1]
    finally:
        done.set()
        asker.join()
        server.terminate()
        server.communicate(timeout=30)
    assert statuses and set(statuses) == {200}


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)
