"""Schema fuzzing (schemathesis, bounded): whatever the OpenAPI schema admits, or breaks, the service never
answers 5xx, and every answer has a documented status, content type and body."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from perpeft.engine.serve.recommend import ServingRun
from perpeft.engine.service.app import create_app


@pytest.fixture(scope="module")
def api_schema(embedded_run):
    config = SchemathesisConfig()
    # Schema-valid bodies and bodies that break the schema (wrong types, missing or extra fields), seeded.
    config.projects.default.generation.update(modes=list(GenerationMode), deterministic=True, database="none")
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(ServingRun.open(embedded_run)), config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_documented_answers(case):
    response = case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    )
    if 400 <= response.status_code < 500:
        body = response.json()
        assert list(body) == ["error"] and "\n" not in body["error"], body
