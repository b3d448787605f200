"""Cold start, memory per replica, and a 10-document request's latency through HTTP vs in-process.

    python benchmarks/latency.py --tokenizer ../shared/tokenizers/llama3 [--requests 200] [--serve-mode both]

For each Serve mode (``high-throughput``, what cluster/ deploys: HAProxy, direct ingress, gRPC between
replicas; ``default``: Serve's Python proxy), one after the other:

1. ``serve run`` on a copy of serve_config.yaml serving the benchmark checkpoint (text model, CPU):
   seconds from launch until ``/v1/health/ready`` answers 200 (cold start).
2. RSS of every Serve replica process, by deployment.
3. The same sequence of fresh 10-document requests, one at a time, through HTTP (keep-alive) and
   through ``Reranker.score`` in this process with the same threads, interleaved: p50/p95 of each, the
   difference of the p50s, and the median of the per-request differences.
4. Where the added time goes, from the ingress's log line of each request (``latency_ms``, the
   preprocess and scorer round trips, the scorer's forward pass): proxy + HTTP, the ingress itself,
   the preprocess hop and the scorer hop, as medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from deployments.haproxy import haproxy_pids  # noqa: E402

from compare import RESULTS, SERVE_MODES, bench_checkpoint, service_config, service_env, stop, wait_ready  # noqa: E402
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


def ingress_log_lines(session_logs: Path, prefix: str) -> dict[int, dict]:
    """The ingress's access-log lines of requests whose x-request-id is ``prefix<n>``, by n."""
    out: dict[int, dict] = {}
    for f in session_logs.glob("serve/replica_*Ingress*.log"):
        for line in f.read_text(errors="replace").splitlines():
            i = line.find('{"event": "rerank_request"')
            if i < 0:
                continue
            try:
                d = json.loads(line[i:])
            except json.JSONDecodeError:
                continue
            rid = d.get("request_id") or ""
            if rid.startswith(prefix) and rid[len(prefix):].isdigit():
                out[int(rid[len(prefix):])] = d
    return out


def measure(mode: str, args, ckpt: Path, reranker, reqs) -> dict:
    port = 18250
    cfg = service_config(ckpt, port, args.threads, RESULTS / "serve_config.latency.yaml")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-lat-", dir="/tmp"))  # this run's Ray logs, nobody else's
    # RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1: the high-throughput mode buffers 1000 access-log lines, and the
    # breakdown below reads them (unbuffered logging, if anything, makes that mode look slower)
    env = dict(service_env(mode), RAY_TMPDIR=str(ray_tmp), RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE="1")
    env.pop("RAY_ADDRESS", None)
    haproxy_before = haproxy_pids()
    proc = subprocess.Popen(["serve", "run", str(cfg)], env=env, start_new_session=True,
                            stdout=open(RESULTS / f"latency-service-{mode}.log", "w"), stderr=subprocess.STDOUT)
    try:
        cold = wait_ready(f"http://127.0.0.1:{port}/v1/health/ready", proc)
        memory = replica_memory()
        http_ms, local_ms, encode_ms = [], [], []
        prefix = f"lat-{mode}-"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            for q, docs in reqs[:5]:  # warm both paths
                c.post("/v1/rerank", json={"query": q, "documents": docs})
                reranker.score(q, docs)
            for i, (q, docs) in enumerate(reqs):  # interleave so both see the same machine load
                t = time.perf_counter()
                resp = c.post("/v1/rerank", json={"query": q, "documents": docs}, headers={"x-request-id": f"{prefix}{i}"})
                http_ms.append((time.perf_counter() - t) * 1000)
                assert resp.status_code == 200, resp.text
                t = time.perf_counter()
                reranker.encode(q, docs)
                encode_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                reranker.score(q, docs)
                local_ms.append((time.perf_counter() - t) * 1000)
        time.sleep(2)  # let the log lines reach the files
        logs = ingress_log_lines(next(ray_tmp.glob("ray/session_*/logs")), prefix)
    finally:
        stop(proc, haproxy_before)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    h, loc, enc = np.array(http_ms), np.array(local_ms), np.array(encode_ms)
    report = {
        "serve_mode": mode,
        "cold_start_s": round(cold, 1),  # from `serve run` (incl. starting Ray) to ready
        "replica_rss_mb": memory,
        "requests": len(reqs),
        "docs_per_request": args.docs,
        "http_p50_ms": round(float(np.percentile(h, 50)), 1),
        "http_p95_ms": round(float(np.percentile(h, 95)), 1),
        "in_process_p50_ms": round(float(np.percentile(loc, 50)), 1),
        "in_process_p95_ms": round(float(np.percentile(loc, 95)), 1),
        "added_p50_ms": round(float(np.percentile(h, 50) - np.percentile(loc, 50)), 1),
        "added_median_of_pairs_ms": round(float(np.median(h - loc)), 1),
    }
    rows = [(i, logs[i]) for i in range(len(reqs)) if i in logs]
    if rows:
        def med(values) -> float:
            return round(float(np.median(values)), 1)

        report["breakdown_ms"] = {  # medians over the requests whose log line was found
            "log_lines": len(rows),
            "proxy_and_http": med([http_ms[i] - d["latency_ms"] for i, d in rows]),
            "ingress_own": med([d["latency_ms"] - d["preprocess_ms"] - d["score_ms"] for i, d in rows]),
            "preprocess_hop": med([d["preprocess_ms"] - enc[i] for i, d in rows]),
            "scorer_hop": med([d["score_ms"] - d["forward_ms"] - d["queue_ms"] for i, d in rows]),
            "scorer_queue": med([d["queue_ms"] for i, d in rows]),
            "forward_minus_in_process_forward": med([d["forward_ms"] - (loc[i] - enc[i]) for i, d in rows]),
        }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--doc-tokens", default="64,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve-mode", choices=sorted(SERVE_MODES) + ["both"], default="both")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    ckpt = bench_checkpoint(args.tokenizer)
    torch.set_num_threads(args.threads)
    from rerank_core import load_reranker

    r = load_reranker(str(ckpt), device="cpu")
    lo, hi = (int(x) for x in args.doc_tokens.split(","))
    reqs = make_requests(Cell(args.docs, (lo, hi), 12), args.requests, r.tokenizer.count_tokens, seed=11)
    modes = ["high-throughput", "default"] if args.serve_mode == "both" else [args.serve_mode]
    reports = [measure(mode, args, ckpt, r, reqs) for mode in modes]
    print(json.dumps(reports, indent=2))
    (RESULTS / "latency.json").write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
