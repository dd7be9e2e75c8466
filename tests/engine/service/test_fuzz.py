"""Schema fuzzing (schemathesis, bounded, seeded): whatever the OpenAPI schema admits, or breaks, the
service never answers 5xx, and every answer has a documented status, content type and body; a 4xx body
is one line of JSON. Driven through schemathesis' strategies rather than its pytest plugin, which lags
behind pytest releases."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from perpeft.engine.serve.recommend import ServingRun
from perpeft.engine.service.app import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(embedded_run):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(ServingRun.open(embedded_run)))


def operations(api_schema) -> dict[str, object]:
    found = [result.ok() for result in api_schema.get_all_operations()]
    return {f"{operation.method.upper()} {operation.path}": operation for operation in found}


def test_every_route_is_fuzzed(api_schema):
    assert set(operations(api_schema)) == {
        "POST /recommend",
        "POST /recommend/batch",
        "GET /items/{item_id}",
        "GET /case/{user_id}",
        "GET /health",
        "GET /ready",
        "GET /metrics",
    }


FUZZED = [
    *(
        (route, mode)
        for route in ("POST /recommend", "POST /recommend/batch", "GET /case/{user_id}")
        for mode in GenerationMode
    ),
    ("GET /items/{item_id}", GenerationMode.POSITIVE),  # any string is a valid id: nothing negative to make
    ("GET /ready", GenerationMode.POSITIVE),
    ("GET /metrics", GenerationMode.POSITIVE),
]


@pytest.mark.parametrize(("route", "mode"), FUZZED)
def test_no_server_errors_and_documented_answers(api_schema, route, mode):
    operation = operations(api_schema)[route]

    @seed(0)
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call_and_validate(checks=CHECKS)
        if 400 <= response.status_code < 500:
            body = response.json()
            assert list(body) == ["error"] and "\n" not in body["error"], body

    check()
