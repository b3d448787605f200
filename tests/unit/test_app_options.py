"""deployments.app.deployment_options: what each replica is started with, in Serve's two modes."""

from __future__ import annotations

import pytest

from deployments.app import GRPC_MESSAGE_BYTES, GRPC_MESSAGE_ENV, deployment_options
from deployments.config import DeploymentArgs

MODE_VARS = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_USE_GRPC_BY_DEFAULT", GRPC_MESSAGE_ENV)


@pytest.fixture
def env(monkeypatch):
    for k in MODE_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _runtime_env(opts: dict) -> dict | None:
    return opts["ray_actor_options"].get("runtime_env")


def test_default_mode_adds_no_runtime_env(env):
    assert _runtime_env(deployment_options(DeploymentArgs(num_cpus=0.1), 8, 2)) is None


def test_grpc_mode_raises_the_message_cap_for_page_images(env):
    env.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    got = _runtime_env(deployment_options(DeploymentArgs(num_cpus=0.1), 8, 2))
    assert got == {"env_vars": {GRPC_MESSAGE_ENV: str(GRPC_MESSAGE_BYTES)}}
    assert GRPC_MESSAGE_BYTES > 64 * 2**20  # a chunk of full-page images, not gRPC's 4 MiB


def test_grpc_off_explicitly_or_cap_set_by_the_cluster(env):
    env.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    env.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")
    assert _runtime_env(deployment_options(DeploymentArgs(num_cpus=0.1), 8, 2)) is None
    env.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")
    env.setenv(GRPC_MESSAGE_ENV, "123456789")  # the cluster's own value wins: the replicas inherit it
    assert _runtime_env(deployment_options(DeploymentArgs(num_cpus=0.1), 8, 2)) is None
