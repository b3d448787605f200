"""Schemathesis fuzzing of every route, generated from the live service's own /openapi.json.

Each operation gets schema-valid requests and (where the schema can be violated: request bodies) schema-
violating ones, a bounded number of each with a fixed seed. Every answer must be a non-5xx status declared
for the operation, with the declared content type, headers and body schema. Checks that judge the API's
*policy* are left out on purpose: the API accepts more than its schema says (lax coercion such as
``"top_n": true``, unknown fields, nulls: real clients send them), and cross-field rules ("documents must not
be empty", "one of text_2 or documents") are checked in code with clear 400s rather than expressed in the
schema.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import good_request

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 30

# Every operation the service documents. A route added without a line here fails test_every_route_is_fuzzed.
OPERATIONS = [
    ("POST", "/v1/rerank"),
    ("POST", "/v2/rerank"),
    ("POST", "/rerank"),
    ("POST", "/v1/ranking"),
    ("POST", "/v1/score"),
    ("POST", "/score"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/health"),
    ("GET", "/v1/health/live"),
    ("GET", "/v1/health/ready"),
]


@pytest.fixture(scope="module")
def api_schema(service):
    return schemathesis.openapi.from_url(service.base_url + "/openapi.json")


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def test_every_route_is_fuzzed(api_schema):
    documented = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert documented == set(OPERATIONS)


def test_documented_examples_are_accepted(service, api_schema, session):
    """The request examples in the OpenAPI document (what /docs shows) are scored: 200 and a valid body."""
    tried = 0
    for method, path in OPERATIONS:
        operation = api_schema[path][method]
        for strategy in api_schema.get_strategies_from_examples(operation):

            @settings(max_examples=1, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def example(case):
                response = case.call(base_url=service.base_url, session=session, timeout=60)
                assert response.status_code == 200, response.text
                case.validate_response(response, checks=CHECKS)

            example()
            tried += 1
    assert tried >= 6  # one per POST route at least


def _modes(method: str) -> list[GenerationMode]:
    # a GET here has nothing that can violate its schema (a string path parameter at most)
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if method == "POST" else [GenerationMode.POSITIVE]


@pytest.mark.parametrize(
    "method,path,mode",
    [(m, p, mode) for m, p in OPERATIONS for mode in _modes(m)],
    ids=lambda v: str(v.value if isinstance(v, GenerationMode) else v),
)
def test_fuzz_operation(service, api_schema, session, method, path, mode):
    operation = api_schema[path][method]
    statuses: dict[int, int] = {}

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # a fixed seed: the same cases on every run
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        response = case.call(base_url=service.base_url, session=session, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    fuzz()
    # hypothesis stops early only when an operation has few distinct inputs (a GET without parameters)
    assert sum(statuses.values()) >= (MAX_EXAMPLES // 2 if method == "POST" else 1), statuses
    assert all(s < 500 for s in statuses), statuses
    # the replicas behind the fuzzed route still serve
    assert good_request(service.base_url).status_code == 200
