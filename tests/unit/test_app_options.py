"""deployments.app.deployment_options: what each replica is started with, in Serve's two modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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


def test_scorer_autoscaling_target_follows_the_batch_it_runs():
    """GPU: a quarter of max_batch_tokens in units; CPU: of the one-pass text batch (cpu_forward_tokens)."""
    from deployments.app import scorer_defaults
    from deployments.config import AutoscalingArgs, ScorerArgs

    s = ScorerArgs(max_batch_tokens=16384, batch_token_unit=256, cpu_forward_tokens=4096,
                   autoscaling=AutoscalingArgs(max_replicas=4))
    assert scorer_defaults(s, use_gpu=True) == (128, 16.0)
    assert scorer_defaults(s, use_gpu=False) == (128, 4.0)  # the queue keeps its room; the target drops
    small = ScorerArgs(max_batch_tokens=2048, batch_token_unit=256, cpu_forward_tokens=4096)
    assert scorer_defaults(small, use_gpu=False) == (16, 2.0)  # never above the batch budget itself
    opts = deployment_options(s, *scorer_defaults(s, use_gpu=False))
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 4.0
    two = s.model_copy(update={"torch_threads": 2})  # a CPU replica with 2 threads runs two 1-thread passes
    assert two.cpu_parallel_passes == 2
    assert scorer_defaults(two, use_gpu=False) == (256, 8.0) and scorer_defaults(two, use_gpu=True) == (128, 16.0)
    pinned = s.model_copy(update={"autoscaling": AutoscalingArgs(max_replicas=4, target_ongoing_requests=9)})
    assert deployment_options(pinned, *scorer_defaults(pinned, False))["autoscaling_config"][
        "target_ongoing_requests"] == 9  # a configured target wins


@pytest.mark.parametrize(
    "fields,threads,passes",
    [
        ({"num_cpus": 0.5}, 1, 1),  # the shipped CPU scorer: one thread, one pass
        ({"num_cpus": 2}, 2, 2),
        ({"torch_threads": 4, "cpu_threads_per_pass": 2}, 4, 2),
        ({"torch_threads": 2, "cpu_threads_per_pass": 8}, 2, 1),  # more per pass than there are: one pass
        ({"torch_threads": 1, "max_concurrent_batches": 3}, 1, 3),  # never fewer than max_concurrent_batches
    ],
)
def test_cpu_scorer_splits_its_threads_into_parallel_passes(fields, threads, passes):
    from deployments.config import ScorerArgs

    s = ScorerArgs(**fields)
    assert (s.cpu_threads, s.cpu_parallel_passes) == (threads, passes)
    assert s.cpu_pass_threads == min(s.cpu_threads_per_pass, threads)
    assert s.concurrent_batches(use_gpu=False) == passes
    assert s.concurrent_batches(use_gpu=True) == s.max_concurrent_batches


def test_batch_wait_defaults_to_none_on_cpu_and_5_ms_on_gpu():
    """A CPU batch starts when a forward thread is free, so by default it does not wait for company; a GPU
    batch waits 5 ms; a value that is set is used on both."""
    from deployments.config import ScorerArgs

    s = ScorerArgs()
    assert s.batch_wait_timeout_s is None
    assert (s.batch_wait_s(cpu=True), s.batch_wait_s(cpu=False)) == (0.0, 0.005)
    set_ = ScorerArgs(batch_wait_timeout_s=0.05)
    assert (set_.batch_wait_s(cpu=True), set_.batch_wait_s(cpu=False)) == (0.05, 0.05)
    with pytest.raises(ValueError):
        ScorerArgs(batch_wait_timeout_s=-1)


def test_inner_queues_hold_what_the_admitted_requests_can_send():
    """The ingress refuses load; the preprocess and scorer queues default to its max_ongoing_requests times
    limits.max_chunks_in_flight, so an admitted request is not refused after some of its chunks were scored."""
    from deployments.app import INGRESS_ONGOING, INGRESS_QUEUED, chunk_calls_admitted
    from deployments.config import AppArgs

    shipped = yaml.safe_load((Path(__file__).parents[2] / "serve_config.yaml").read_text())["applications"][0]["args"]
    cfg = AppArgs.model_validate(shipped)
    assert chunk_calls_admitted(cfg) == INGRESS_ONGOING * cfg.limits.max_chunks_in_flight == 256 * 16
    assert all(m.scorer.max_queued_requests is None and m.preprocess.max_queued_requests is None for m in cfg.models)
    cfg = AppArgs.model_validate({**shipped, "ingress": {"max_ongoing_requests": 10},
                                  "limits": {"max_chunks_in_flight": 3}})
    assert chunk_calls_admitted(cfg) == 30
    assert deployment_options(DeploymentArgs(), 8, 2)["max_queued_requests"] == INGRESS_QUEUED
    assert deployment_options(DeploymentArgs(), 8, 2, default_queued=30)["max_queued_requests"] == 30
    # a CPU scorer takes every chunk call into its own FIFO (Serve's router queue does not keep their order);
    # on GPU the router keeps the excess for replicas the autoscaler adds
    from deployments.app import scorer_defaults

    s = cfg.models[0].scorer
    assert scorer_defaults(s, use_gpu=False, admitted_chunk_calls=4096)[0] == 4096
    assert scorer_defaults(s, use_gpu=True, admitted_chunk_calls=4096) == scorer_defaults(s, use_gpu=True)
    assert scorer_defaults(s, use_gpu=False, admitted_chunk_calls=4)[0] == scorer_defaults(s, use_gpu=False)[0]
    # set in the config, it wins (the reliability tests shrink the queues)
    pinned = deployment_options(DeploymentArgs(max_queued_requests=3), 8, 2, default_queued=30)
    assert pinned["max_queued_requests"] == 3
