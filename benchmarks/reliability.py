"""Reliability runs against a live service: fuzzing, bad input, replica kills, a rolling update, a lost node.

    python benchmarks/reliability.py --tokenizer ../shared/tokenizers/llama3
    python benchmarks/reliability.py --tokenizer ../shared/tokenizers/llama3 --scenarios fuzz,scorer-kill

The long counterpart of tests/reliability/ (which runs the fast cases in CI). Scenarios:

- ``fuzz``: schemathesis over every operation of the service's /openapi.json, schema-valid and schema-violating
  requests (``--fuzz-examples`` each); every answer must be a declared, non-5xx status matching its schema.
- ``bad-input``: the hostile inputs of tests/reliability/test_bad_input.py (broken JSON on every route, wrong
  types, huge and odd text, broken images, decompression bombs, URLs), each followed by an ordinary request.
- ``scorer-kill`` / ``preprocess-kill``: steady load (``--concurrency`` clients), then ``ray.kill`` of one replica;
  Serve replaces it, the ingress retries the chunks that were on it.
- ``rolling-update``: steady load, then ``serve deploy`` of a changed config (another batch wait, a new model
  alias): every deployment rolls; no request may fail.
- ``node-kill``: a multi-node ``ray.cluster_utils.Cluster`` (ingress on the head, preprocess and scorer replicas
  on two worker nodes), steady load, then one worker node is killed (``remove_node(allow_graceful=False)``).

The service is ``serve run`` of the benchmark config (compare.py: serve_config.yaml serving the bench checkpoint
on CPU) with two preprocess and two scorer replicas (``--replicas``), in a private Ray temp dir so nothing else on
the machine can join it. Prints one row per scenario: requests sent, accepted (200), rejected with 503/429,
failed (any other outcome that breaks the contract: an undocumented status, a schema mismatch, a connection
error; for fault scenarios any other non-2xx), 500s, hung (no answer within the client timeout), p99 latency of
the requests that overlapped the fault, seconds until throughput is back to 80% of the pre-fault rate (and stays
there), and fuzz cases tried. Writes everything to benchmarks/results/reliability.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from deployments.haproxy import haproxy_pids  # noqa: E402

from compare import MODEL, bench_checkpoint, service_config, stop, wait_ready  # noqa: E402
from workload import Cell, TextFactory  # noqa: E402

SCENARIOS = ["fuzz", "bad-input", "scorer-kill", "preprocess-kill", "rolling-update", "node-kill"]
CLIENT_TIMEOUT_S = 90.0  # the service gives up on a request after 60 s: no answer by 90 s is a hung request
COLUMNS = [("scenario", 16), ("sent", 7), ("accepted", 9), ("503/429", 8), ("failed", 7), ("500s", 5), ("hung", 5),
           ("p99 fault s", 12), ("recover s", 10), ("fuzz cases", 10)]


# ------------------------------------------------------------------------------------------------------ load
class Load:
    """``concurrency`` clients posting rerank requests back to back, in a thread of their own.

    Every request is recorded as (start, end, outcome): an HTTP status, "hung" (client timeout) or the name of
    a connection error.
    """

    def __init__(self, url: str, bodies: list[dict], concurrency: int):
        self.url, self.bodies, self.concurrency = url, bodies, concurrency
        self.records: list[tuple[float, float, int | str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float, int | str]]:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT_S + 30)
        return self.records

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, k) for k in range(self.concurrency)))

    async def _worker(self, client: httpx.AsyncClient, k: int) -> None:
        i = k
        while not self._stop.is_set():
            body = self.bodies[i % len(self.bodies)]
            i += self.concurrency
            t0 = time.monotonic()
            try:
                r = await client.post(self.url, json=body)
                outcome: int | str = r.status_code
            except httpx.TimeoutException:
                outcome = "hung"
            except httpx.HTTPError as e:
                outcome = type(e).__name__
                await asyncio.sleep(0.2)  # connection refused while a proxy/node is down: do not spin
            self.records.append((t0, time.monotonic(), outcome))

    def ok_rate(self, since: float, until: float) -> float:
        n = sum(1 for _, t1, o in self.records if o == 200 and since <= t1 < until)
        return n / max(until - since, 1e-9)


def make_bodies(tokenizer: str, n: int, docs: int, doc_tokens: tuple[int, int], seed: int = 7) -> list[dict]:
    from rerank_core.tokenization import PromptTokenizer

    count = PromptTokenizer(tokenizer).count_tokens
    factory = TextFactory(count, seed=seed)
    cell = Cell(docs_per_request=docs, doc_tokens=doc_tokens)
    return [{"model": MODEL, "query": q, "documents": d} for q, d in (factory.request(cell) for _ in range(n))]


def fault_row(name: str, records: list, t_fault: float, t_end: float, baseline_rps: float, t_back: float | None,
              extra: dict) -> dict:
    """Counts over every request, p99 over those that overlapped the fault window, and the recovery time.

    ``t_back``: when the fault was repaired (replica replaced, update rolled out), None if it never was.
    """
    outcomes = [o for _, _, o in records]
    recover = recovery_s(records, t_fault, t_end, t_back, baseline_rps)
    window_end = t_fault + max(recover if recover is not None else t_end - t_fault, 10.0)
    during = [t1 - t0 for t0, t1, o in records if t1 >= t_fault and t0 <= window_end]
    row = {
        "scenario": name,
        "sent": len(outcomes),
        "accepted": sum(o == 200 for o in outcomes),
        "rejected_503_429": sum(o in (503, 429) for o in outcomes),
        "failed": sum(o not in (200, 503, 429) for o in outcomes),
        "server_errors_500": sum(isinstance(o, int) and o >= 500 and o not in (503, 504) for o in outcomes),
        "hung": sum(o == "hung" for o in outcomes),
        "p99_during_fault_s": round(float(np.percentile(during, 99)), 2) if during else None,
        "recover_s": recover,
        "fuzz_cases": None,
        "baseline_ok_per_s": round(baseline_rps, 2),
        "repaired_s": round(t_back - t_fault, 1) if t_back is not None else None,
        "outcomes": {str(k): outcomes.count(k) for k in sorted(set(outcomes), key=str)},
        "throughput_ok_per_s": timeline(records, t_fault),
    }
    row.update(extra)
    return row


RATE_WINDOW_S = 10.0
RATE_SHARE = 0.8


def recovery_s(records: list, t_fault: float, t_end: float, t_back: float | None, baseline_rps: float) -> float | None:
    """Seconds from the fault until throughput is back: the end of the last ``RATE_WINDOW_S`` window (stepped by
    1 s) whose rate of 200s is under ``RATE_SHARE`` of the pre-fault rate, among windows that start before the
    repair was done plus one window (later dips are the machine's noise, not the fault). 0 if no window dipped;
    None if the fault was never repaired or the rate is still low at the end of the run."""
    if t_back is None:
        return None
    ends = np.array(sorted(t1 for _, t1, o in records if o == 200))
    last_start = min(t_end - RATE_WINDOW_S, t_back + RATE_WINDOW_S)
    starts = np.arange(t_fault, last_start + 1e-9, 1.0)
    if len(starts) == 0:
        return None
    rates = np.array([((ends >= s) & (ends < s + RATE_WINDOW_S)).sum() / RATE_WINDOW_S for s in starts])
    low = np.nonzero(rates < RATE_SHARE * baseline_rps)[0]
    if len(low) == 0:
        return 0.0
    if starts[low[-1]] + RATE_WINDOW_S > t_end - 1.0:
        return None  # still low when the run ended
    return round(float(starts[low[-1]] + RATE_WINDOW_S - t_fault), 1)


def timeline(records: list, t_ref: float, step: float = 2.0) -> list[tuple[float, float]]:
    ends = [t1 - t_ref for _, t1, o in records if o == 200]
    if not ends:
        return []
    lo, hi = min(ends), max(ends)
    out = []
    t = lo
    while t < hi:
        out.append((round(t, 1), round(sum(1 for e in ends if t <= e < t + step) / step, 2)))
        t += step
    return out


# -------------------------------------------------------------------------------------------- the service
class Service:
    """``serve run`` of the benchmark config in a private Ray temp dir, and a driver connected to it."""

    def __init__(self, args: argparse.Namespace, ckpt: Path, vl_ckpt: Path | None):
        self.port = args.port
        self.base = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix="rrb-", dir="/tmp")  # short: Unix socket paths are limited
        self.env = dict(os.environ, RAY_TMPDIR=self.tmp, RAY_AUTH_MODE="disabled")
        self.env.pop("RAY_ADDRESS", None)
        cfg_path = service_config(ckpt, self.port, args.threads, RESULTS / "serve_config.reliability.yaml",
                                  args.docs_per_chunk)
        cfg = yaml.safe_load(cfg_path.read_text())
        text = cfg["applications"][0]["args"]["models"][0]
        for part in (text["preprocess"], text["scorer"]):
            part["num_replicas"] = args.replicas
            part["max_surge_percent"] = 100  # a rolling update starts the new replica before stopping the old
        cfg["applications"][0]["args"]["ingress"]["max_surge_percent"] = 100
        if args.replicas > 1:
            text["scorer"]["torch_threads"] = max(1, args.threads // args.replicas)
        if vl_ckpt is not None:  # the VL model too (tiny weights), for the image cases of bad-input
            full = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
            vl = next(m for m in full["models"] if m["name"] == "vl")
            vl["source"] = str(vl_ckpt)
            for part in (vl["preprocess"], vl["scorer"]):
                part.pop("autoscaling", None)
                part.update(num_replicas=1, max_surge_percent=100)
            vl["scorer"]["torch_threads"] = 1
            cfg["applications"][0]["args"]["models"].append(vl)
        # CPUs are logical here: small reservations, so surge replicas of a rolling update fit next to the old
        args_ = cfg["applications"][0]["args"]
        for part in [args_["ingress"]] + [m[k] for m in args_["models"] for k in ("preprocess", "scorer")]:
            part["num_cpus"] = 0.1
        cfg_path.write_text(yaml.safe_dump(cfg))
        self.cfg, self.cfg_path = cfg, cfg_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Service:
        log = open(RESULTS / "reliability-service.log", "w")
        self.haproxy_before = haproxy_pids()
        self.proc = subprocess.Popen(["serve", "run", str(self.cfg_path)], env=self.env, cwd=REPO,
                                     start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.ready_s = wait_ready(f"{self.base}/v1/health/ready", self.proc)
        os.environ.update(RAY_TMPDIR=self.tmp, RAY_AUTH_MODE="disabled")
        import ray

        ctx = ray.init(address="auto", namespace="serve", log_to_driver=False)
        self.dashboard = "http://" + ctx.dashboard_url if ctx.dashboard_url else None
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.proc is not None:
            stop(self.proc, self.haproxy_before)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def replicas(self, deployment: str) -> list[str]:
        import ray

        prefix = f"SERVE_REPLICA::rerank#{deployment}#"
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(prefix))

    def running(self, deployment: str) -> int:
        from ray import serve

        app = serve.status().applications.get("rerank")
        return app.deployments[deployment].replica_states.get("RUNNING", 0) if app else 0

    def deploy(self, cfg: dict, path: Path) -> float:
        path.write_text(yaml.safe_dump(cfg))
        t0 = time.monotonic()
        subprocess.run(["serve", "deploy", str(path), "--address", self.dashboard], env=self.env, check=True,
                       capture_output=True)
        return time.monotonic() - t0


# ------------------------------------------------------------------------------------------------ scenarios
OPERATIONS = [("POST", p) for p in ("/v1/rerank", "/v2/rerank", "/rerank", "/v1/ranking", "/v1/score", "/score")] + [
    ("GET", p) for p in ("/v1/models", "/v1/models/{model_id}", "/health", "/v1/health/live", "/v1/health/ready")]


def run_fuzz(base: str, examples: int, seed: int) -> dict:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    documented = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    statuses: dict[str, int] = {}
    failures: list[str] = []
    latencies: list[float] = []
    hung = 0
    session = requests.Session()
    def fuzz_one(operation, mode, label: str) -> None:
        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            nonlocal hung
            t0 = time.monotonic()
            try:
                response = case.call(base_url=base, session=session, timeout=CLIENT_TIMEOUT_S)
            except requests.Timeout:
                hung += 1
                return
            except requests.RequestException as e:
                failures.append(f"{label} connection error: {type(e).__name__}")
                return
            latencies.append(time.monotonic() - t0)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            try:
                case.validate_response(response, checks=checks)
            except Exception as e:  # noqa: BLE001 - collected, the run goes on
                failures.append(f"{label} {response.status_code}: {str(e)[:300]}")

        fuzz()

    for method, path in sorted(documented):
        for mode in [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if method == "POST" else []):
            fuzz_one(schema[path][method], mode, f"{method} {path} [{mode.value}]")
    sent = sum(statuses.values()) + hung
    return {
        "scenario": "fuzz", "sent": sent, "accepted": sum(v for k, v in statuses.items() if k.startswith("2")),
        "rejected_503_429": statuses.get("503", 0) + statuses.get("429", 0), "failed": len(failures),
        "server_errors_500": sum(v for k, v in statuses.items() if k.startswith("5") and k not in ("503", "504")),
        "hung": hung, "p99_during_fault_s": None, "recover_s": None, "fuzz_cases": sent,
        "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
        "statuses": statuses, "failures": failures[:50], "operations": sorted(f"{m} {p}" for m, p in documented),
        "operations_missing_from_list": sorted(f"{m} {p}" for m, p in documented - set(OPERATIONS)),
    }


def run_bad_input(base: str) -> dict:
    """Every case of tests/reliability/test_bad_input.py, each followed by an ordinary request."""
    from tests.reliability import test_bad_input as cases

    sent: list[tuple[str, str, int | str, int]] = []  # (case, route, got, wanted)
    hung = 0
    latencies = []
    with httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT_S) as c:

        def post(case: str, route: str, want: int, **kw) -> None:
            nonlocal hung
            t0 = time.monotonic()
            try:
                got: int | str = c.post(route, **kw).status_code
            except httpx.TimeoutException:
                got, hung = "hung", hung + 1
            latencies.append(time.monotonic() - t0)
            sent.append((case, route, got, want))
            ok = c.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
            sent.append((case + " (then a good request)", "/v1/rerank", ok.status_code, 200))

        for route in cases.POST_ROUTES:
            for name, raw in cases.RAW_BODIES.items():
                post(name, route, 400, content=raw, headers={"content-type": "application/json"})
        for name, route, body, status, _ in cases.FIELD_CASES:
            if isinstance(body, bytes):
                post(name, route, status, content=body, headers={"content-type": "application/json"})
            else:
                post(name, route, status, json=body)
        for name, image, status, _ in cases.IMAGE_CASES:
            post(name, "/v1/ranking", status, json={"model": cases.VL, "query": {"text": "q"},
                                                    "passages": [{"text": "fine"}, {"image": image}]})
    wrong = [f"{case} {route}: got {got}, documented {want}" for case, route, got, want in sent if got != want]
    got = [g for _, _, g, _ in sent]
    return {
        "scenario": "bad-input", "sent": len(sent), "accepted": got.count(200),
        "rejected_503_429": got.count(503) + got.count(429), "failed": len(wrong),
        "server_errors_500": sum(isinstance(g, int) and g >= 500 and g not in (503, 504) for g in got), "hung": hung,
        "p99_during_fault_s": None, "recover_s": None, "fuzz_cases": len(sent) // 2,
        "p99_s": round(float(np.percentile(latencies, 99)), 3), "wrong_status": wrong,
    }


def steady(svc_base: str, bodies: list, args: argparse.Namespace) -> tuple[Load, float, float]:
    """Start the load, let it settle, and measure the pre-fault throughput (200s per second)."""
    load = Load(f"{svc_base}/v1/rerank", bodies, args.concurrency).start()
    time.sleep(args.warmup)
    t0 = time.monotonic()
    time.sleep(args.baseline)
    t1 = time.monotonic()
    return load, load.ok_rate(t0, t1), t1


def run_kill(svc: Service, bodies: list, deployment: str, args: argparse.Namespace) -> dict:
    before = svc.replicas(deployment)
    load, baseline, t_fault = steady(svc.base, bodies, args)
    import ray

    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    t_fault = time.monotonic()
    want = len(before)
    replaced_at = None
    dipped = False
    while time.monotonic() - t_fault < args.observe:
        n = svc.running(deployment)
        dipped |= n < want
        if dipped and n == want and before[0] not in svc.replicas(deployment):
            replaced_at = time.monotonic()
            break
        time.sleep(0.25)
    time.sleep(args.settle)
    t_end = time.monotonic()
    records = load.stop()
    name = "scorer-kill" if deployment.startswith("Scorer") else "preprocess-kill"
    return fault_row(name, records, t_fault, t_end, baseline, replaced_at, {"killed": before[0]})


def run_rolling_update(svc: Service, bodies: list, args: argparse.Namespace) -> dict:
    import copy

    new = copy.deepcopy(svc.cfg)
    text = new["applications"][0]["args"]["models"][0]
    text["scorer"]["batch_wait_timeout_s"] = 0.002
    text["aliases"] = [*text.get("aliases", []), "rerank-rolling-v2"]
    load, baseline, _ = steady(svc.base, bodies, args)
    t_fault = time.monotonic()
    deploy_s = svc.deploy(new, RESULTS / "serve_config.reliability.v2.yaml")
    from ray import serve

    done_at = None
    while time.monotonic() - t_fault < args.observe + 120:
        app = serve.status().applications.get("rerank")
        alias = httpx.get(f"{svc.base}/v1/models/rerank-rolling-v2", timeout=30).status_code == 200
        if app is not None and app.status == "RUNNING" and alias and all(
                d.status == "HEALTHY" for d in app.deployments.values()):
            done_at = time.monotonic()
            break
        time.sleep(0.5)
    time.sleep(args.settle)
    t_end = time.monotonic()
    records = load.stop()
    return fault_row("rolling-update", records, t_fault, t_end, baseline, done_at,
                     {"serve_deploy_s": round(deploy_s, 1)})


def run_node_kill(args: argparse.Namespace, ckpt: Path) -> dict:
    """The node scenario runs in a child process: one process cannot hold two Ray clusters."""
    tmp = tempfile.mkdtemp(prefix="rrn-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--node-kill-child", "--tokenizer", args.tokenizer,
           "--concurrency", str(args.concurrency), "--warmup", str(args.warmup), "--baseline", str(args.baseline),
           "--observe", str(args.observe), "--settle", str(args.settle), "--threads", str(args.threads),
           "--docs", str(args.docs), "--doc-tokens", args.doc_tokens, "--port", str(args.port),
           "--docs-per-chunk", str(args.docs_per_chunk),
           "--checkpoint", str(ckpt)]
    with open(RESULTS / "reliability-node-kill.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=1500)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    lines = [ln for ln in out.splitlines() if ln.startswith("NODE_KILL_RESULT ")]
    if not lines:
        return {"scenario": "node-kill", "error": f"no result (exit {proc.returncode}); see reliability-node-kill.log"}
    return json.loads(lines[-1][len("NODE_KILL_RESULT "):])


def node_kill_child(args: argparse.Namespace) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build_app

    result: dict = {"scenario": "node-kill"}
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=3, resources={"worker": 1}) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        port = args.port + 1
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        cfg = yaml.safe_load(service_config(Path(args.checkpoint), port, args.threads,
                                            RESULTS / "serve_config.reliability.nodes.yaml",
                                            args.docs_per_chunk).read_text())
        app_args = cfg["applications"][0]["args"]
        text = app_args["models"][0]
        app_args["ingress"].update(num_cpus=0.1, num_replicas=1, resources={"head": 0.01})
        for part in (text["preprocess"], text["scorer"]):  # one replica of each per worker node (SPREAD)
            part.update(num_cpus=0.1, num_replicas=2, resources={"worker": 0.01})
        text["scorer"]["torch_threads"] = 1
        serve.run(build_app(app_args), name="rerank", route_prefix="/")
        base = f"http://127.0.0.1:{port}"

        def placement() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for info in ray._private.state.actors(actor_state_name="ALIVE").values():
                name = info.get("Name") or ""
                if name.startswith("SERVE_REPLICA::rerank#"):
                    out.setdefault(name.split("#")[1], []).append(info["Address"]["NodeID"])
            return out

        before = placement()
        result["placement_before"] = before
        victim = next((w for w in workers if w.node_id in before.get("Scorer-text", [])), workers[-1])
        result["victim_hosted"] = {d: nodes.count(victim.node_id) for d, nodes in before.items()}
        bodies = make_bodies(args.tokenizer, 200, args.docs, tuple(int(x) for x in args.doc_tokens.split(",")))
        load, baseline, _ = steady(base, bodies, args)
        cluster.remove_node(victim, allow_graceful=False)
        t_fault = time.monotonic()
        replaced_at = None
        while time.monotonic() - t_fault < args.observe:
            now = placement()
            moved = all(len(now.get(d, [])) == len(before[d]) and victim.node_id not in now[d] for d in before)
            st = serve.status().applications.get("rerank")
            if moved and st is not None and all(
                    st.deployments[d].replica_states.get("RUNNING", 0) == len(before[d]) for d in before):
                replaced_at = time.monotonic()
                break
            time.sleep(0.5)
        time.sleep(args.settle)
        t_end = time.monotonic()
        records = load.stop()
        result = fault_row("node-kill", records, t_fault, t_end, baseline, replaced_at, {
            "placement_before": before, "placement_after": placement(), "victim_hosted": result["victim_hosted"]})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
    finally:
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001, S110 - best-effort cleanup
            pass
        ray.shutdown()
        cluster.shutdown()
        print("NODE_KILL_RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    keys = ["scenario", "sent", "accepted", "rejected_503_429", "failed", "server_errors_500", "hung",
            "p99_during_fault_s", "recover_s", "fuzz_cases"]
    lines = ["  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(COLUMNS))]
    for r in rows:
        if "error" in r and "sent" not in r:
            lines.append(f"{r['scenario']:<16}  error: {r['error'].splitlines()[0][:100]}")
            continue
        cells = []
        for i, (k, (_, w)) in enumerate(zip(keys, COLUMNS)):
            v = r.get(k)
            v = "-" if v is None else v
            cells.append(f"{v:<{w}}" if i == 0 else f"{v:>{w}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--vl-tokenizer", default=None, help="default: the --tokenizer folder with -vl appended")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--fuzz-examples", type=int, default=150, help="cases per operation and mode")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--docs", type=int, default=16, help="documents per request (two chunks of 8)")
    ap.add_argument("--doc-tokens", default="32,128")
    ap.add_argument("--docs-per-chunk", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2, help="preprocess and scorer replicas")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--baseline", type=float, default=20.0)
    ap.add_argument("--observe", type=float, default=120.0, help="longest wait for the replacement")
    ap.add_argument("--settle", type=float, default=20.0, help="load kept on after the replacement")
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--node-kill-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.node_kill_child:
        return node_kill_child(args)
    if args.vl_tokenizer is None:
        args.vl_tokenizer = str(Path(args.tokenizer).resolve()) + "-vl"
    RESULTS.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.scenarios.split(",") if s]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {sorted(unknown)}")
    ckpt = bench_checkpoint(args.tokenizer)
    vl_ckpt = None
    if args.vl_tokenizer and Path(args.vl_tokenizer, "tokenizer.json").exists():
        from rerank_core.tiny import make_tiny

        vl_ckpt = RESULTS / "bench-vl-tiny"
        if not (vl_ckpt / "model.safetensors").exists():
            make_tiny("vl", str(vl_ckpt), tokenizer=args.vl_tokenizer)
    bodies = make_bodies(args.tokenizer, 200, args.docs, tuple(int(x) for x in args.doc_tokens.split(",")))
    rows: list[dict] = []
    report = {"args": vars(args), "rows": rows}
    out = RESULTS / "reliability.json"

    def record(row: dict) -> None:
        rows.append(row)
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k not in ("throughput_ok_per_s",)}), flush=True)

    service_scenarios = [s for s in wanted if s != "node-kill"]
    if service_scenarios:
        with Service(args, ckpt, vl_ckpt) as svc:
            report["service_ready_s"] = round(svc.ready_s, 1)
            for name in service_scenarios:
                t0 = time.monotonic()
                if name == "fuzz":
                    row = run_fuzz(svc.base, args.fuzz_examples, args.seed)
                elif name == "bad-input":
                    row = run_bad_input(svc.base)
                elif name == "scorer-kill":
                    row = run_kill(svc, bodies, "Scorer-text", args)
                elif name == "preprocess-kill":
                    row = run_kill(svc, bodies, "Preprocess-text", args)
                else:
                    row = run_rolling_update(svc, bodies, args)
                row["scenario_s"] = round(time.monotonic() - t0, 1)
                record(row)
    if "node-kill" in wanted:
        t0 = time.monotonic()
        args.checkpoint = str(ckpt)
        row = run_node_kill(args, ckpt)
        row["scenario_s"] = round(time.monotonic() - t0, 1)
        record(row)
    print()
    print(table(rows))
    print(f"\nfailed: fault scenarios count any non-2xx other than 503/429; fuzz and bad-input count answers that "
          f"break the contract (undocumented status, schema mismatch). JSON: {out}")


if __name__ == "__main__":
    main()
