"""Multi-node scenario for tests/cluster/test_multinode.py, run in its own process.

A local multi-node Ray cluster shaped like the RayService: a head with 0 CPUs, one CPU-only worker node
and one "GPU" node (a logical GPU, and only the logical CPUs cluster/gen_rayservice.py gives GPU pods).
It serves serve_config.yaml's app (accelerator gpu, a tiny checkpoint, small num_cpus, API keys from a
file), checks where replicas run and what /v1/rerank returns, then adds a second CPU node, removes the
first one while requests keep coming, and watches the service recover.

Prints one line ``SCENARIO_RESULT {json}`` (facts only; the test asserts on them). Ray and Serve are
shut down in ``finally`` whatever happens. Exit status 0 unless the scenario itself crashed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RERANK_SHARED_DIR", REPO.parent / "shared"))
APP = "rerank"
API_KEY = "multinode-test-key-0123456789"
QUERY = "how much protein should a female eat?"
DOCS = [
    "As a general guideline, the average requirement of protein for women is 46 grams per day.",
    "Definition of summit for English language learners: the highest point of a mountain.",
    "Calorie intake should not fall below 1,200 a day in women.",
    "protein",
]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_rayservice", REPO / "cluster" / "gen_rayservice.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_kind(model: dict) -> str:
    """"vl" for the multimodal reranker, else "text" (by id, as the published names go)."""
    return "vl" if "vl" in model["id"].split("/")[-1].split("-") else "text"


def app_args(tiny: dict[str, str], keys_file: str) -> dict:
    """serve_config.yaml's args as the cluster runs them, with tiny checkpoints and small num_cpus.

    Scorers keep serve_config.yaml's num_cpus / num_gpus (the GPU node is sized from them, as GPU pods
    are) and start with exactly as many replicas as fill one GPU. The ingress and preprocess replicas select
    the CPU worker group's node label, as in the RayService; without it Serve's SPREAD placement sometimes
    put one on the GPU node, and a scorer then found too little CPU there to start.
    """
    import yaml

    gen = _load_generator()
    cfg = gen.with_overrides(yaml.safe_load((REPO / "serve_config.yaml").read_text()), keys_file, pin_cpu_pool=True)
    args = copy.deepcopy(cfg["applications"][0]["args"])
    args["auth"]["reload_s"] = 0.5
    args["ingress"]["num_cpus"] = 0.1
    for m in args["models"]:
        m["source"] = tiny[model_kind(m)]
        m["preprocess"]["num_cpus"] = 0.1

    def start(m: dict) -> int:
        sc = m["scorer"]
        return sc["num_replicas"] if sc.get("num_replicas") else (sc.get("autoscaling") or {}).get("min_replicas", 1)

    def set_start(m: dict, n: int) -> None:
        sc = m["scorer"]
        if sc.get("autoscaling"):
            sc["autoscaling"]["min_replicas"] = n
            sc["autoscaling"]["max_replicas"] = max(n, sc["autoscaling"].get("max_replicas", 1))
        else:
            sc["num_replicas"] = n

    free = 1.0 - sum(start(m) * m["scorer"]["num_gpus"] for m in args["models"])
    if free < -1e-9:
        raise RuntimeError("serve_config.yaml's scorers need more than one GPU at start; extend the scenario")
    first = args["models"][0]
    set_start(first, start(first) + int(free / first["scorer"]["num_gpus"] + 1e-9))
    return args


def replica_nodes() -> dict[str, list[str]]:
    """Deployment name -> node ids of its ALIVE replica actors (from the GCS actor table)."""
    import ray

    out: dict[str, list[str]] = {}
    for info in ray._private.state.actors(actor_state_name="ALIVE").values():
        name = info.get("Name") or ""
        if not name.startswith("SERVE_REPLICA::"):
            continue
        app, _, rest = name[len("SERVE_REPLICA::"):].partition("#")
        deployment = rest.split("#")[0]
        if app == APP:
            out.setdefault(deployment, []).append(info["Address"]["NodeID"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def post(url: str, body: dict, key: str | None = API_KEY, timeout: float = 30.0) -> tuple[int, dict | None]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except Exception:  # noqa: BLE001
            return e.code, None
    except Exception:  # noqa: BLE001 - connection refused / reset / timeout while a node goes away
        return -1, None


def wait_for(pred, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def timer(result: dict, t0: float):
    """``mark(name)``: record seconds since ``t0`` (``time.monotonic()``) under ``result["timings_s"][name]``."""

    def mark(name: str) -> None:
        result["timings_s"][name] = round(time.monotonic() - t0, 1)

    return mark


def prepare(result: dict, prefix: str) -> dict:
    """Tiny checkpoints of both models and an API keys file in a temp dir (``result["_tmp"]``, removed by
    ``main``), and the app's args for them (``app_args``)."""
    from rerank_core.tiny import make_tiny

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ["RAY_TMPDIR"]))
    result["_tmp"] = str(tmp)
    tiny = {}
    for kind, tok in (("text", SHARED / "tokenizers" / "llama3"), ("vl", SHARED / "tokenizers" / "llama3-vl")):
        tok_dir = str(tok) if (tok / "tokenizer.json").exists() else None
        tiny[kind] = make_tiny(kind, str(tmp / f"tiny-{kind}"), tokenizer=tok_dir)
    keys_file = tmp / "keys"
    keys_file.write_text(API_KEY + "\n")
    return app_args(tiny, str(keys_file))


def run(result: dict) -> None:
    t0 = time.monotonic()
    marks = result["timings_s"]
    mark = timer(result, t0)

    import numpy as np
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build_app
    from rerank_core import load_reranker

    args = prepare(result, "rerank-multinode-")
    models = {m["name"]: m for m in args["models"]}
    result["models"] = {name: {"id": m["id"], "kind": model_kind(m)} for name, m in models.items()}
    result["deployments"] = ["Ingress"] + [f"{p}-{n}" for n in models for p in ("Preprocess", "Scorer")]
    gen = _load_generator()
    k8s_cfg = gen.with_overrides(gen.load_serve_config(), gen.API_KEYS_FILE)
    gpu_cpus = gen.gpu_node_num_cpus(k8s_cfg)
    result["gpu_node_num_cpus"] = gpu_cpus
    mark("prepared")

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
        shutdown_at_exit=True,
    )
    result["_cluster"] = cluster
    cpu_a = cluster.add_node(num_cpus=2, labels=dict(gen.CPU_POOL_LABEL))  # the RayService's CPU group
    gpu = cluster.add_node(num_cpus=gpu_cpus, num_gpus=1)
    nodes = {"head": cluster.head_node.node_id, "cpu_a": cpu_a.node_id, "gpu": gpu.node_id}
    result["nodes"] = nodes
    ray.init(address=cluster.address, log_to_driver=False)
    mark("cluster_up")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # One proxy, on the head: every "node" here shares 127.0.0.1, so per-node proxies would clash on the port.
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    serve.run(build_app(args), name=APP, route_prefix="/")
    mark("app_running")

    result["placement_before"] = replica_nodes()
    result["scorer_stats"] = {}
    for name in models:
        stats = serve.get_deployment_handle(f"Scorer-{name}", APP).stats.remote().result(timeout_s=60)
        result["scorer_stats"][name] = {k: stats[k] for k in ("device", "gpu_ids", "cuda_visible_devices")}

    expected = {
        name: np.asarray(load_reranker(m["source"], device="cpu").score(QUERY, DOCS), dtype=np.float64)
        for name, m in models.items()
    }

    def check(tag: str) -> None:
        """/v1/rerank for every model, compared with the same checkpoint scored in this process."""
        out = result.setdefault(tag, {})
        for name, m in models.items():
            status, body = post(f"{base}/v1/rerank", {"model": m["id"], "query": QUERY, "documents": DOCS,
                                                      "raw_scores": True})
            entry = out[name] = {"status": status}
            if status == 200:
                got = {r["index"]: r["relevance_score"] for r in body["results"]}
                entry["indices"] = [r["index"] for r in body["results"]]
                entry["expected_indices"] = [int(i) for i in np.argsort(-expected[name], kind="stable")]
                entry["max_abs_diff"] = float(max(abs(got[i] - expected[name][i]) for i in range(len(DOCS))))

    check("rerank")
    result["unauthenticated_status"] = post(f"{base}/v1/rerank", {"query": QUERY, "documents": DOCS}, key=None)[0]
    mark("checked_serving")

    # ------------------------------------------------------------------ lose the CPU node under traffic
    cpu_b = cluster.add_node(num_cpus=2, labels=dict(gen.CPU_POOL_LABEL))
    nodes["cpu_b"] = cpu_b.node_id
    mark("cpu_b_added")
    log: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            s, _ = post(f"{base}/v1/rerank", {"query": QUERY, "documents": DOCS[:2]}, timeout=20)
            log.append((round(time.monotonic() - t0, 2), s))
            time.sleep(0.2)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    time.sleep(1.0)
    removed_at = time.monotonic()
    cluster.remove_node(cpu_a)
    mark("cpu_a_removed")

    def recovered() -> dict | None:
        placement = replica_nodes()
        moved = all(
            placement.get(d) and all(n != nodes["cpu_a"] for n in placement[d]) for d in result["deployments"]
        )
        ok_after = [s for t, s in log if t > marks["cpu_a_removed"] and s == 200]
        app = serve.status().applications.get(APP)
        running = app is not None and app.status == "RUNNING"
        return placement if (moved and ok_after and running) else None

    placement_after = wait_for(recovered, timeout=120)
    result["recovery_s"] = round(time.monotonic() - removed_at, 1) if placement_after else None
    time.sleep(2.0)  # a few more requests on the recovered service
    stop.set()
    worker.join(timeout=30)
    mark("recovered")
    result["placement_after"] = placement_after or replica_nodes()
    result["traffic"] = log
    check("rerank_final")


def main(scenario=None) -> int:
    """Run ``scenario(result)`` (this file's ``run`` by default), clean up, print the result line."""
    scenario = scenario or run
    result: dict = {"timings_s": {}, "error": None}
    t0 = time.monotonic()
    # A private Ray temp dir: Cluster() records its address in <temp>/ray/ray_current_cluster, and a plain
    # ray.init() in any other process on this machine (another test session) would join this cluster.
    own_tmpdir = None
    if not os.environ.get("RAY_TMPDIR"):
        own_tmpdir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # short: Unix socket paths are limited
        os.environ["RAY_TMPDIR"] = own_tmpdir
    result["ray_tmpdir"] = os.environ["RAY_TMPDIR"]
    try:
        scenario(result)
    except BaseException as e:  # noqa: BLE001 - reported to the test, cleaned up below
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-4000:]}"
    finally:
        cluster = result.pop("_cluster", None)
        tmp = result.pop("_tmp", None)
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001, S110 - best-effort cleanup
            pass
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001, S110 - best-effort cleanup
            pass
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception:  # noqa: BLE001, S110 - best-effort cleanup
                pass
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if own_tmpdir:
            shutil.rmtree(own_tmpdir, ignore_errors=True)
        result["timings_s"]["total"] = round(time.monotonic() - t0, 1)
        print("SCENARIO_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
