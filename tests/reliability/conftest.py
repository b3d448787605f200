"""Helpers of the reliability tests (bad input, overload, faults, security, isolation).

The session fixtures (`ray_cluster`, `service`, `tiny_text`, `tiny_vl`) come from tests/conftest.py. Cases that
need another configuration (tiny queues, a short request timeout, two replicas to kill one of) run against
small text-only apps deployed next to the service on the same cluster and proxy (``aux``), under their own
names and route prefixes; they are deleted when the directory's tests are done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import config_args

TEXT = "nvidia/llama-nemotron-rerank-1b-v2"
VL = "nvidia/llama-nemotron-rerank-vl-1b-v2"


def text_app_args(tiny_text: str, *, ingress: dict | None = None, preprocess: dict | None = None,
                  scorer: dict | None = None, limits: dict | None = None, http: dict | None = None,
                  tokenize_in_ingress: bool | None = None, bundle_scorer_calls: bool | None = None) -> dict:
    """serve_config.yaml's args serving only the text model on CPU, one small replica per deployment."""
    args = config_args({"text": tiny_text, "vl": tiny_text})
    text = next(m for m in args["models"] if m["name"] == "text")
    text["preprocess"] = {"num_cpus": 0.1, "num_replicas": 1, **(preprocess or {})}
    text["scorer"] = {"num_cpus": 0.1, "num_gpus": 0, "num_replicas": 1, **(scorer or {})}
    if tokenize_in_ingress is not None:
        text["tokenize_in_ingress"] = tokenize_in_ingress
    if bundle_scorer_calls is not None:
        text["bundle_scorer_calls"] = bundle_scorer_calls
    args["models"] = [text]
    args["ingress"] = {"num_cpus": 0.1, "num_replicas": 1, **(ingress or {})}
    args["accelerator"] = "cpu"
    args["limits"].update(limits or {})
    if http:
        args["http"] = http
    return args


# name -> (what it is for, args builder)
AUX_APPS = {
    # Bounded queues and a short timeout. The ingress takes six requests at a time plus two waiting at the proxy;
    # the scorer one chunk plus three waiting from the ingress, and each request sends at most two chunks at once
    # (a lone request always fits, with room for the router's count of a chunk that just finished). Requests give
    # up after 5 s; small chunks and small batches mean a cancelled request leaves little work behind. Every
    # chunk is a call of its own (no bundles), so the scorer's bounds above count chunks.
    "rel-limits": lambda t: text_app_args(
        t,
        bundle_scorer_calls=False,
        ingress={"max_ongoing_requests": 6, "max_queued_requests": 2},
        scorer={"max_ongoing_requests": 1, "max_queued_requests": 3, "max_batch_tokens": 2048,
                "cpu_forward_tokens": 2048},
        limits={"docs_per_chunk": 8, "request_timeout_s": 5.0, "max_chunks_in_flight": 2},
    ),
    # Two replicas of the preprocess and scorer deployments, so one of each can be killed (text goes through
    # the preprocess replicas here, not the CPU default of tokenizing in the ingress). CORS on for one origin;
    # a 64 KiB body limit.
    "rel-faults": lambda t: text_app_args(
        t,
        tokenize_in_ingress=False,
        preprocess={"num_replicas": 2},
        scorer={"num_replicas": 2},
        limits={"max_body_bytes": 65536},
        http={"cors_allow_origins": ["https://app.example"]},
    ),
}


@dataclass
class AuxApps:
    base_url: str

    def url(self, app: str, path: str = "") -> str:
        return f"{self.base_url}/{app}{path}"


@pytest.fixture(scope="package")
def aux(service, tiny_text) -> AuxApps:
    from ray import serve

    from deployments.app import build_app

    targets = [
        serve.RunTarget(build_app(make(tiny_text)), name=name, route_prefix=f"/{name}")
        for name, make in AUX_APPS.items()
    ]
    serve.run_many(targets)  # deployed side by side; returns once every app is RUNNING
    try:
        yield AuxApps(service.base_url)
    finally:
        for name in AUX_APPS:
            serve.delete(name)


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live Serve replica actors of one deployment (``SERVE_REPLICA::app#deployment#id``)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_replica(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    return st.deployments[deployment].replica_states.get("RUNNING", 0)


def wait_until(pred, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def good_request(base_url: str, model: str = TEXT, prefix: str = "") -> httpx.Response:
    """One ordinary request: proof that the replica behind it still serves."""
    return httpx.post(f"{base_url}{prefix}/v1/rerank",
                      json={"model": model, "query": "protein intake", "documents": ["46 grams a day", "a summit"]},
                      timeout=120)
