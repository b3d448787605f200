"""The app on a multi-node Ray cluster shaped like the RayService (see multinode_scenario.py).

The scenario runs in a subprocess with a Ray cluster of its own (see scenario_runner.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .scenario_runner import REPO, run_scenario

HERE = Path(__file__).resolve().parent
TIMEOUT_S = int(os.environ.get("RERANK_MULTINODE_TIMEOUT_S", "480"))  # ~2-3 min normally


@pytest.fixture(scope="module")
def scenario() -> dict:
    return run_scenario(HERE / "multinode_scenario.py", TIMEOUT_S)


def _on(placement: dict, deployment: str) -> set[str]:
    nodes = placement.get(deployment) or []
    assert nodes, f"no ALIVE replica of {deployment}: {placement}"
    return set(nodes)


def _split(scenario: dict) -> tuple[list[str], list[str]]:
    deps = scenario["deployments"]
    return [d for d in deps if d.startswith("Scorer-")], [d for d in deps if not d.startswith("Scorer-")]


def test_every_model_of_serve_config_is_deployed(scenario):
    import yaml

    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    names = [m["name"] for app in cfg["applications"] for m in app["args"]["models"]]
    assert sorted(scenario["models"]) == sorted(names)
    assert set(scenario["placement_before"]) == set(scenario["deployments"])


def test_gpu_node_is_sized_like_the_gpu_pods(scenario):
    # the GPU node advertises only the CPUs the generator gives GPU pods (rayStartParams num-cpus)
    assert scenario["gpu_node_num_cpus"] == 1


def test_scorers_only_on_the_gpu_node(scenario):
    nodes = scenario["nodes"]
    scorers, _ = _split(scenario)
    for d in scorers:
        assert _on(scenario["placement_before"], d) == {nodes["gpu"]}, d
    # the 0.5-GPU scorer replicas fill the one GPU exactly
    assert sum(len(scenario["placement_before"][d]) for d in scorers) == 2
    for name, stats in scenario["scorer_stats"].items():
        # Ray gave each scorer the logical GPU (torch sees no CUDA here, so it computes on CPU)
        assert stats["gpu_ids"] == ["0"] and stats["cuda_visible_devices"] == "0", name


def test_cpu_deployments_only_on_cpu_nodes(scenario):
    nodes = scenario["nodes"]
    _, cpu_deps = _split(scenario)
    assert "Ingress" in cpu_deps and len(cpu_deps) == 1 + len(scenario["models"])
    for d in cpu_deps:
        assert _on(scenario["placement_before"], d) == {nodes["cpu_a"]}, d
    assert nodes["head"] not in {n for v in scenario["placement_before"].values() for n in v}


def _served_correctly(checks: dict, models: dict) -> None:
    assert set(checks) == set(models)
    for name, c in checks.items():
        assert c["status"] == 200, (name, c)
        assert c["indices"] == c["expected_indices"], name
        assert c["max_abs_diff"] < 1e-4, name


def test_serves_rerank_correctly_with_api_keys(scenario):
    _served_correctly(scenario["rerank"], scenario["models"])
    assert scenario["unauthenticated_status"] == 401


def test_keeps_serving_when_a_cpu_node_is_removed(scenario):
    nodes = scenario["nodes"]
    assert scenario["recovery_s"] is not None, f"did not recover: {scenario['placement_after']}"
    after = scenario["placement_after"]
    scorers, cpu_deps = _split(scenario)
    # ingress and preprocessing were rescheduled onto the remaining CPU node, scorers stayed on the GPU
    for d in cpu_deps:
        assert _on(after, d) == {nodes["cpu_b"]}, d
    for d in scorers:
        assert _on(after, d) == {nodes["gpu"]}, d
    removed_at = scenario["timings_s"]["cpu_a_removed"]
    after_removal = [status for t, status in scenario["traffic"] if t > removed_at]
    assert after_removal and after_removal[-1] == 200, scenario["traffic"]
    _served_correctly(scenario["rerank_final"], scenario["models"])
