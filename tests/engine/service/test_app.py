"""The HTTP service on a small embedded demo run: answers equal the engine's `recommend`, bad input is a
4xx with one line of JSON, metrics count what was served."""

import json

import pytest
from fastapi.testclient import TestClient

from perpeft.engine.serve.recommend import ServingRun, recommend
from perpeft.engine.service.app import MAX_BATCH, MAX_BODY_BYTES, create_app


@pytest.fixture(scope="module")
def serving(embedded_run) -> ServingRun:
    return ServingRun.open(embedded_run)


@pytest.fixture(scope="module")
def client(serving) -> TestClient:
    return TestClient(create_app(serving), raise_server_exceptions=False)


def as_response(answer) -> dict:
    return {"items": answer.items, "scores": answer.scores, "group": answer.group, "assigned_by": answer.assigned_by}


def assert_same(answer: dict, expected: dict) -> None:
    """Same items, group and rule; scores equal up to float32 rounding (batched products)."""
    assert {key: answer[key] for key in ("items", "group", "assigned_by")} == {
        key: expected[key] for key in ("items", "group", "assigned_by")
    }
    assert answer["scores"] == pytest.approx(expected["scores"], rel=1e-5)


def test_known_user_equals_recommend(client, embedded_run, serving):
    user = serving.dataset.user_ids[5]
    response = client.post("/recommend", json={"user": user, "k": 7})
    assert response.status_code == 200, response.text
    assert_same(response.json(), as_response(recommend(embedded_run, 7, user=user)))
    assert response.json()["assigned_by"] == "known_user"


def test_new_user_with_exclusions_equals_recommend(client, embedded_run, serving):
    ids = serving.dataset.item_ids
    body = {"history": [ids[4], ids[30], ids[4]], "k": 5, "exclude": [ids[11]]}
    response = client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    expected = recommend(embedded_run, 5, history=body["history"], exclude=body["exclude"])
    assert_same(response.json(), as_response(expected))
    assert response.json()["assigned_by"] == "nearest_centroid"
    assert not set(response.json()["items"]) & {ids[4], ids[30], ids[11]}


def test_batch_answers_each_body_in_order(client, serving):
    ids, users = serving.dataset.item_ids, serving.dataset.user_ids
    bodies = [
        {"user": users[3], "k": 2},
        {"history": [ids[7]], "k": 4},
        {"user": users[90], "k": 1, "exclude": [ids[2]]},
    ]
    response = client.post("/recommend/batch", json=bodies)
    assert response.status_code == 200, response.text
    singles = [client.post("/recommend", json=body).json() for body in bodies]
    for answer, single in zip(response.json(), singles, strict=True):
        assert_same(answer, single)
    assert [len(answer["items"]) for answer in response.json()] == [2, 4, 1]


def test_items_health_ready(client, serving):
    dataset = serving.dataset
    item = client.get(f"/items/{dataset.item_ids[3]}")
    assert item.status_code == 200
    assert item.json() == {"item": dataset.item_ids[3], "title": dataset.titles[3], "has_image": True}
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["groups"] == 2
    assert (ready["items"], ready["users"]) == (dataset.num_items, dataset.num_users)


def test_metrics_count_requests_latency_and_assignments(serving):
    client = TestClient(create_app(serving))
    user = serving.dataset.user_ids[1]
    for _ in range(3):
        client.post("/recommend", json={"user": user, "k": 2})
    client.post("/recommend/batch", json=[{"history": [serving.dataset.item_ids[1]]}, {"user": user}])
    client.get("/items/none-such")
    text = client.get("/metrics").text
    assert 'perpeft_requests_total{route="/recommend",method="POST",status="200"} 3' in text
    assert 'perpeft_requests_total{route="/items/{item_id}",method="GET",status="404"} 1' in text
    assert 'perpeft_request_seconds_count{route="/recommend",method="POST"} 3' in text
    assert 'perpeft_request_seconds_bucket{route="/recommend",method="POST",le="+Inf"} 3' in text
    assert 'perpeft_users_served_total{assigned_by="known_user"} 4' in text
    assert 'perpeft_users_served_total{assigned_by="nearest_centroid"} 1' in text


BAD_BODIES = [
    ({"user": "nobody"}, 422, "user: unknown id nobody"),
    ({"history": ["i0001", "nope"]}, 422, "history: unknown id nope"),
    ({"history": []}, 422, "history: give at least one item id"),
    ({"user": "u00001", "exclude": ["zz"]}, 422, "exclude: unknown id zz"),
    ({"user": "u00001", "k": 0}, 422, "k: "),
    ({"user": "u00001", "k": 1001}, 422, "k: "),
    ({"user": "u00001", "k": "ten"}, 422, "k: "),
    ({"k": 3}, 422, "exactly one of user and history"),
    ({"user": "u00001", "history": ["i0001"]}, 422, "exactly one of user and history"),
    ({"user": "u00001", "colour": "red"}, 422, "colour: "),
    ({"user": "u00001", "two\nlines": 1}, 422, "'two\\nlines': "),
    ({"user": "new\nline"}, 422, "user: unknown id 'new\\nline'"),
    ([1, 2], 422, ""),
]


@pytest.mark.parametrize(("body", "status", "fragment"), BAD_BODIES)
def test_bad_bodies_are_one_line_4xx(client, body, status, fragment):
    response = client.post("/recommend", json=body)
    assert response.status_code == status, response.text
    assert_one_line_error(response, fragment)


def test_malformed_json_oversized_batch_and_body(client):
    malformed = client.post("/recommend", content=b'{"user": "u00001",', headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    assert_one_line_error(malformed, "malformed JSON")
    oversized = client.post("/recommend/batch", json=[{"user": "u00001"}] * (MAX_BATCH + 1))
    assert oversized.status_code == 413
    assert_one_line_error(oversized, f"at most {MAX_BATCH}")
    empty = client.post("/recommend/batch", json=[])
    assert empty.status_code == 422
    assert_one_line_error(empty, "")
    huge = client.post("/recommend", content=b" " * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert_one_line_error(huge, "body: at most")
    in_batch = client.post("/recommend/batch", json=[{"user": "u00001"}, {"user": "u00001", "k": -1}])
    assert in_batch.status_code == 422
    assert_one_line_error(in_batch, "1.k: ")


def test_unknown_routes_and_methods_are_json(client):
    assert_one_line_error(client.get("/nowhere"), "Not Found")
    assert client.get("/recommend").status_code == 405
    assert_one_line_error(client.get("/recommend"), "Method Not Allowed")


def test_openapi_schema_documents_the_routes(client):
    schema = client.get("/openapi.json").json()
    assert {"/recommend", "/recommend/batch", "/items/{item_id}", "/health", "/ready", "/metrics"} <= set(
        schema["paths"]
    )
    request = schema["components"]["schemas"]["RecommendRequest"]
    assert request["properties"]["k"]["maximum"] == 1000 and request["additionalProperties"] is False


def assert_one_line_error(response, fragment: str) -> None:
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and fragment in body["error"], json.dumps(body)


def test_case_page_shows_history_and_three_columns(client, serving):
    user = serving.dataset.user_ids[6]
    page = client.get(f"/case/{user}", params={"k": 4})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert f"Case study · user {user}" in text
    assert text.count("<section>") == 4 and "Global PEFT" in text and "PerPEFT · own group" in text
    assert text.count('src="data:image/jpeg;base64,') >= 3 * 4
    assert_one_line_error(client.get("/case/nobody"), "user: unknown id nobody")
    assert client.get(f"/case/{user}", params={"k": 0}).status_code == 422
    assert_one_line_error(client.get(f"/case/{user}", params={"other_group": 7}), "--other-group 7")
