"""Shared fixtures: tiny checkpoints in the published layouts, and one local Ray cluster per session
running the real serve_config.yaml against them (built lazily, only by the tests that ask for it).

The cluster declares logical resources (8 CPUs, 2 GPUs) so the config's replicas schedule on a 2-core
machine and the GPU code path is exercised (torch sees no CUDA, so scorers fall back to CPU). The
service's two scorers take 0.5 GPU each and pack onto one logical GPU; the other is for packing tests.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RERANK_SHARED_DIR", REPO.parent / "shared"))
LLAMA3_TOKENIZER = SHARED / "tokenizers" / "llama3"
LLAMA3_VL_TOKENIZER = SHARED / "tokenizers" / "llama3-vl"


def _need(path: Path) -> str:
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"the real Llama 3 tokenizer is not at {path} (set RERANK_SHARED_DIR to the shared folder)")
    return str(path)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> str:
    return _need(LLAMA3_TOKENIZER)


@pytest.fixture(scope="session")
def llama3_vl_tokenizer_dir() -> str:
    return _need(LLAMA3_VL_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory, llama3_tokenizer_dir) -> str:
    """Tiny text reranker with the real tokenizer (float32 weights)."""
    from rerank_core.tiny import make_tiny

    return make_tiny("text", str(tmp_path_factory.mktemp("tiny-text")), tokenizer=llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_text_small_tok(tmp_path_factory) -> str:
    """Tiny text reranker with the self-built tokenizer (no shared files needed)."""
    from rerank_core.tiny import make_tiny

    return make_tiny("text", str(tmp_path_factory.mktemp("tiny-text-small")))


@pytest.fixture(scope="session")
def text_reranker(tiny_text):
    from rerank_core import load_reranker

    return load_reranker(tiny_text, device="cpu")


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory, llama3_vl_tokenizer_dir) -> str:
    """Tiny VL reranker (published layout, tiny SigLIP and Llama) with the real VL tokenizer, float32."""
    from rerank_core.tiny import make_tiny

    return make_tiny("vl", str(tmp_path_factory.mktemp("tiny-vl")), tokenizer=llama3_vl_tokenizer_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_args(sources: dict[str, str], keys_file: str | None = None) -> dict:
    """The real serve_config.yaml args with model sources replaced (and auth pointed at a test file)."""
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = copy.deepcopy(cfg["applications"][0]["args"])
    for m in args["models"]:
        m["source"] = sources[m["name"]]
    if keys_file is not None:
        args["auth"]["api_keys_file"] = keys_file
        args["auth"]["reload_s"] = 0.2
    return args


class Service:
    def __init__(self, base_url: str, keys_file: Path, sources: dict[str, str]):
        self.base_url = base_url
        self.keys_file = keys_file
        self.sources = sources
        self.client = httpx.Client(base_url=base_url, timeout=120)

    def set_keys(self, keys: list[str]) -> None:
        """Write the API keys file and wait until the ingress has picked it up."""
        self.keys_file.write_text("\n".join(keys) + "\n")
        os.utime(self.keys_file)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = self.client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
            if (r.status_code == 401) == bool(keys):
                return
            time.sleep(0.2)
        raise AssertionError("the ingress did not reload the keys file")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    metrics_port = free_port()
    # replicas inherit these: autoscaling metrics every second (tests wait less), and a longer deadline
    # for queue-length probes on a slow, shared CI machine
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1")
    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    ray.metrics_port = metrics_port  # for tests that scrape the Prometheus endpoint
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_cluster, tiny_text, tiny_vl, tmp_path_factory) -> Service:
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    keys_file = tmp_path_factory.mktemp("auth") / "keys"
    keys_file.write_text("")
    sources = {"text": tiny_text, "vl": tiny_vl}
    args = config_args(sources, str(keys_file))
    # this cluster has (logical) GPUs, where preprocess replicas tokenize by default: the text model takes the
    # CPU default instead (the ingress tokenizes its text chunks), so the API tests cover both paths
    next(m for m in args["models"] if m["name"] == "text")["tokenize_in_ingress"] = True
    serve.run(build_app(args), name="rerank", route_prefix="/")
    svc = Service(f"http://127.0.0.1:{port}", keys_file, sources)
    yield svc
    svc.client.close()
    serve.shutdown()
