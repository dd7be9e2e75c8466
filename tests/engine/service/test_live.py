"""A running service takes in a new catalog version whole: added items are served from the next
request on, a catalog that cannot be read leaves the served version in place."""

import asyncio

from fastapi.testclient import TestClient

from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.catalog import add_items
from perpeft.engine.serve.recommend import ServingRun, recommend
from perpeft.engine.service.app import create_app


def test_a_new_catalog_version_is_swapped_in(embedded_copy, tmp_path, item_copies):
    run = embedded_copy
    app = create_app(ServingRun.open(run), reload_seconds=None)
    client, live = TestClient(app), app.state.live
    trained_items = live.serving.dataset.num_items
    item_file, ids = item_copies(run, tmp_path / "new", [1, 2])
    assert client.get("/ready").json()["catalog_version"] == 0
    assert client.get(f"/items/{ids[0]}").status_code == 404
    assert client.post("/recommend", json={"history": ids, "k": 3}).status_code == 422

    add_items(run, item_file, progress=False)
    assert client.get(f"/items/{ids[0]}").status_code == 404  # published, not yet taken in
    assert asyncio.run(live.refresh()) is True
    assert asyncio.run(live.refresh()) is False  # catalog.json unchanged: nothing to do
    ready = client.get("/ready").json()
    assert ready["catalog_version"] == 1 and ready["items"] == trained_items + 2
    item = client.get(f"/items/{ids[0]}").json()
    assert item["item"] == ids[0] and item["has_image"] is True
    answer = client.post("/recommend", json={"history": ids, "k": 4}).json()
    assert answer["items"] == recommend(run, 4, history=ids).items

    RunDirectory.open(run).embedded_catalog.write_text("{not json")
    assert asyncio.run(live.refresh()) is False
    assert client.get("/ready").json()["catalog_version"] == 1
    assert client.get(f"/items/{ids[1]}").status_code == 200
