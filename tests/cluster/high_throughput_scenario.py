"""Serve's high-throughput mode, for tests/cluster/test_high_throughput.py, run in its own process.

``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy in front, replicas take HTTP directly) and
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (gRPC between replicas, routers on the caller's event loop) are set
cluster-wide, as cluster/ and the README recommend for production. Both change the request path under
every deployment, so this checks what could break: scores through HTTP for both models (a VL chunk's
tiles go preprocess -> scorer as a chained response), errors that cross a replica boundary keep their
status, auth, the access log, and Ray Data's ``ServeBatchScorer`` (synchronous handle calls).

Prints one line ``SCENARIO_RESULT {json}`` (facts only; the test asserts on them). Ray and Serve are
shut down in ``finally`` whatever happens.
"""

from __future__ import annotations

import base64
import collections
import io
import os
import sys
import time
from pathlib import Path

os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.cluster.multinode_scenario import (  # noqa: E402
    APP,
    DOCS,
    QUERY,
    free_port,
    main,
    model_kind,
    post,
    prepare,
    timer,
    wait_for,
)


def png_data_url(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run(result: dict) -> None:
    mark = timer(result, time.monotonic())

    import numpy as np
    import ray
    from ray import serve

    from deployments.app import build_app
    from rerank_core import load_reranker

    args = prepare(result, "rerank-ht-")
    for part in [args["ingress"]] + [m["preprocess"] for m in args["models"]]:  # one node here, no CPU pool
        part.pop("label_selector", None)
    models = {m["name"]: m for m in args["models"]}
    mark("prepared")

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP, route_prefix="/")
    mark("app_running")

    from ray.serve._private import constants

    result["modes"] = {
        "ha_proxy": constants.RAY_SERVE_ENABLE_HA_PROXY,
        "direct_ingress": constants.RAY_SERVE_ENABLE_DIRECT_INGRESS,
        "grpc_between_replicas": constants.RAY_SERVE_USE_GRPC_BY_DEFAULT,
    }
    def ready_status() -> int | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{base}/v1/health/ready", timeout=5) as r:
                return r.status
        except Exception:  # noqa: BLE001 - not routed yet
            return None

    # HAProxy picks up the ingress replica shortly after serve.run
    result["ready_status"] = wait_for(ready_status, timeout=60)
    mark("ready")

    images = [png_data_url((200, 30, 30)), png_data_url((30, 200, 30), (300, 200))]
    for name, m in models.items():
        r = load_reranker(m["source"], device="cpu")
        if model_kind(m) == "vl":
            wire: list = [DOCS[0], {"image": images[0]}, {"text": DOCS[1], "image": images[1]}]
            local_docs = [DOCS[0], {"image": base64.b64decode(images[0].split(",", 1)[1])},
                          {"text": DOCS[1], "image": base64.b64decode(images[1].split(",", 1)[1])}]
        else:
            wire = local_docs = DOCS
        expected = np.asarray(r.score(QUERY, local_docs), dtype=np.float64)
        status, body = post(f"{base}/v1/rerank", {"model": m["id"], "query": QUERY, "documents": wire,
                                                  "raw_scores": True})
        entry = result.setdefault("rerank", {})[name] = {"status": status, "documents": len(wire)}
        if status == 200:
            got = {x["index"]: x["relevance_score"] for x in body["results"]}
            entry["max_abs_diff"] = float(max(abs(got[i] - expected[i]) for i in range(len(wire))))
            entry["indices"] = [x["index"] for x in body["results"]]
            entry["expected_indices"] = [int(i) for i in np.argsort(-expected, kind="stable")]
    mark("scored")

    text_id = models["text"]["id"]
    result["errors"] = {
        # raised in the preprocess replica, carried back over gRPC: must stay a 400, not become a 500
        "query_too_long": post(f"{base}/v1/rerank", {"model": text_id, "query": "word " * 3000,
                                                     "documents": ["a"]})[0],
        "undecodable_image": post(f"{base}/v1/rerank", {"model": models["vl"]["id"], "query": QUERY, "documents": [
            {"image": "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()}]})[0],
        "unknown_model": post(f"{base}/v1/rerank", {"model": "nope", "query": QUERY, "documents": ["a"]})[0],
        "no_key": post(f"{base}/v1/rerank", {"query": QUERY, "documents": ["a"]}, key=None)[0],
        "empty_documents": post(f"{base}/v1/rerank", {"query": QUERY, "documents": []})[0],
    }
    result["after_errors_status"] = post(f"{base}/v1/rerank", {"query": QUERY, "documents": DOCS})[0]
    mark("errors")

    # a scorer replica dies under traffic: the ingress must see it as a lost replica (retry, else 503) even
    # though the call failed inside gRPC, never a 500
    import threading

    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(post(f"{base}/v1/rerank", {"query": QUERY, "documents": DOCS * 8}, timeout=30)[0])

    workers = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(2.0)
    before_kill = len(statuses)
    victim = next(info for info in ray._private.state.actors(actor_state_name="ALIVE").values()
                  if (info.get("Name") or "").startswith(f"SERVE_REPLICA::{APP}#Scorer-text#"))
    ray.kill(ray.get_actor(victim["Name"], namespace="serve"), no_restart=True)
    time.sleep(8.0)
    stop.set()
    for w in workers:
        w.join(timeout=60)
    counts = dict(collections.Counter(str(st) for st in statuses[before_kill:]))
    result["scorer_kill"] = {"before": before_kill, "after": counts, "last": statuses[-1] if statuses else None}
    result["after_kill_status"] = post(f"{base}/v1/rerank", {"query": QUERY, "documents": DOCS}, timeout=60)[0]
    mark("scorer_kill")

    import ray.data

    from deployments.batch import rerank_dataset

    rows = [{"query": QUERY, "document": d} for d in DOCS] + [{"query": "x " * 5000, "document": "too long"}]
    out = rerank_dataset(ray.data.from_items(rows), serve_app=APP, serve_model="text", num_actors=1,
                         num_cpus=0.1, batch_size=8, max_length=64, truncate="NONE").take_all()
    r = load_reranker(models["text"]["source"], device="cpu")
    expected = r.score(QUERY, DOCS)
    by_doc = {row["document"]: row for row in out}
    result["ray_data"] = {
        "rows": len(out),
        "max_abs_diff": float(max(abs(by_doc[d]["logit"] - e) for d, e in zip(DOCS, expected))),
        "errors": [row["error"] for row in out if row["error"]],
    }
    mark("ray_data")


if __name__ == "__main__":
    sys.exit(main(run))
