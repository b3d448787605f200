"""Cold start, memory per replica, and a 10-document request's latency through HTTP vs in-process.

    python benchmarks/latency.py --tokenizer ../shared/tokenizers/llama3 [--requests 200]

1. ``serve run`` on a copy of serve_config.yaml serving the benchmark checkpoint (text model, CPU):
   seconds from launch until ``/v1/health/ready`` answers 200 (cold start).
2. RSS of every Serve replica process, by deployment.
3. The same sequence of fresh 10-document requests, one at a time, through HTTP (keep-alive) and
   through ``Reranker.score`` in this process with the same threads: p50/p95 and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import RESULTS, bench_checkpoint, service_config, stop, wait_ready  # noqa: E402
from loadgen import make_requests  # noqa: E402
from workload import Cell  # noqa: E402


def replica_memory() -> dict[str, float]:
    import psutil

    out: dict[str, list[float]] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:" in cmd:
            name = cmd.split("ServeReplica:")[1].split()[0].split(".")[0]
            out.setdefault(name, []).append(p.info["memory_info"].rss / 2**20)
    return {k: round(max(v), 1) for k, v in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--doc-tokens", default="64,256")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    ckpt = bench_checkpoint(args.tokenizer)
    port = 18250
    cfg = service_config(ckpt, port, args.threads, RESULTS / "serve_config.latency.yaml")
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    proc = subprocess.Popen(["serve", "run", str(cfg)], env=env, start_new_session=True,
                            stdout=open(RESULTS / "latency-service.log", "w"), stderr=subprocess.STDOUT)
    torch.set_num_threads(args.threads)
    from rerank_core import load_reranker

    try:
        cold = wait_ready(f"http://127.0.0.1:{port}/v1/health/ready", proc)
        memory = replica_memory()
        r = load_reranker(str(ckpt), device="cpu")
        lo, hi = (int(x) for x in args.doc_tokens.split(","))
        reqs = make_requests(Cell(args.docs, (lo, hi), 12), args.requests, r.tokenizer.count_tokens, seed=11)
        http_ms, local_ms = [], []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            for q, docs in reqs[:5]:  # warm both paths
                c.post("/v1/rerank", json={"query": q, "documents": docs})
                r.score(q, docs)
            for q, docs in reqs:  # interleave so both see the same machine load
                t = time.perf_counter()
                resp = c.post("/v1/rerank", json={"query": q, "documents": docs})
                http_ms.append((time.perf_counter() - t) * 1000)
                assert resp.status_code == 200, resp.text
                t = time.perf_counter()
                r.score(q, docs)
                local_ms.append((time.perf_counter() - t) * 1000)
        h, loc = np.array(http_ms), np.array(local_ms)
        report = {
            "cold_start_s": round(cold, 1),  # from `serve run` (incl. starting Ray) to ready
            "replica_rss_mb": memory,
            "requests": len(reqs),
            "docs_per_request": args.docs,
            "http_p50_ms": round(float(np.percentile(h, 50)), 1),
            "http_p95_ms": round(float(np.percentile(h, 95)), 1),
            "in_process_p50_ms": round(float(np.percentile(loc, 50)), 1),
            "in_process_p95_ms": round(float(np.percentile(loc, 95)), 1),
            "added_p50_ms": round(float(np.percentile(h, 50) - np.percentile(loc, 50)), 1),
        }
        print(json.dumps(report, indent=2))
        (RESULTS / "latency.json").write_text(json.dumps(report, indent=2))
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
