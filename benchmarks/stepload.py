"""Autoscaling under a step load: replicas, throughput and latency over time, from serve_config.yaml as shipped.

    python benchmarks/stepload.py --tokenizer ../shared/tokenizers/llama3 \\
        --steps 2:40,16:120,2:60,0:120 --docs 32 --doc-tokens 64,512

1. ``serve run`` on a copy of serve_config.yaml serving the benchmark checkpoint (text model only, CPU),
   keeping every deployment's ``autoscaling`` block as written (``--scorer-autoscaling`` overrides fields
   of the scorer's, e.g. ``max_replicas=2,downscale_delay_s=30``).
2. A closed-loop load whose concurrency follows ``--steps`` (``concurrency:seconds`` pairs; 0 is idle).
   Every request carries fresh texts, as in loadgen.py.
3. Once a second, the replica states of each deployment from the Ray dashboard's Serve REST API
   (``/api/serve/applications/``), with Serve's autoscaling target where the API gives one.

Prints and writes JSON (``results/stepload.json``): a 2-second timeline (requests in flight, pairs/s and
p50 latency over the trailing 10 s, running and target replicas per deployment) and, per step, throughput,
p50/p99, the replica range, and how long after the step began each deployment first changed its replica
count. With matplotlib, also ``stepload.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import (  # noqa: E402
    RESULTS, SERVE_MODES, bench_checkpoint, parse_overrides, start_service, stop, text_only_config, wait_ready,
)
from loadgen import body_for  # noqa: E402
from workload import Cell, TextFactory  # noqa: E402

APP_PORT = 18400
DASHBOARD = "http://127.0.0.1:8265"


def parse_steps(text: str) -> list[tuple[int, float]]:
    """``"2:40,16:120,0:60"`` -> [(2, 40.0), (16, 120.0), (0, 60.0)]."""
    steps = []
    for part in filter(None, text.split(",")):
        c, s = part.split(":")
        if int(c) < 0 or float(s) <= 0:
            raise ValueError(f"bad step {part!r}: want concurrency>=0:seconds>0")
        steps.append((int(c), float(s)))
    if not steps:
        raise ValueError("no steps")
    return steps


def stepload_config(ckpt: Path, out: Path, scorer_autoscaling: dict, scorer: dict | None = None) -> Path:
    """serve_config.yaml with only the text model on the benchmark checkpoint, on CPU; scaling as shipped.
    ``scorer``: other scorer fields to override (``max_ongoing_requests``, ``cpu_forward_tokens``, ...)."""
    cfg, _, text = text_only_config(ckpt, APP_PORT)
    text["scorer"].update(scorer or {})
    if scorer_autoscaling:
        text["scorer"].pop("num_replicas", None)
        text["scorer"]["autoscaling"] = {**(text["scorer"].get("autoscaling") or {}), **scorer_autoscaling}
    out.write_text(yaml.safe_dump(cfg))
    return out


def replica_counts(client: httpx.Client) -> dict[str, dict]:
    """{deployment: {"running": n, "states": {...}, "target": n or None}} from the dashboard's Serve API."""
    r = client.get(f"{DASHBOARD}/api/serve/applications/", timeout=5)
    r.raise_for_status()
    out: dict[str, dict] = {}
    for app in (r.json().get("applications") or {}).values():
        for name, dep in (app.get("deployments") or {}).items():
            states: dict[str, int] = {}
            for rep in dep.get("replicas") or []:
                states[rep.get("state", "?")] = states.get(rep.get("state", "?"), 0) + 1
            target = dep.get("target_num_replicas")
            out[name] = {"running": states.get("RUNNING", 0), "states": states, "target": target}
    return out


class FreshRequests:
    """A pool of requests sized with the tokenizer before the clock starts; each use gets a new serial
    number in front of the query and every document (string work only), so no cache helps the server."""

    def __init__(self, factory: TextFactory, cell: Cell, pool: int = 64):
        self.pool = [factory.request(cell) for _ in range(pool)]
        self.n = 0

    def next(self) -> tuple[str, list[str]]:
        self.n += 1
        query, docs = self.pool[self.n % len(self.pool)]
        tag = f"<{self.n}>"
        return f"{tag} {query}", [f"{tag} {d}" for d in docs]


async def run_load(url: str, steps: list[tuple[int, float]], fresh: FreshRequests,
                   records: list, t0: float, bounds: list) -> None:
    """Closed loop: during each step, ``c`` workers send requests back to back. A step ends once its last
    request has returned (so it can run over); its real (start, end) goes to ``bounds``."""
    # aiohttp, one kept-alive connection per worker: ~0.1 ms of client CPU per request (httpx: 1.2-2.7 ms)
    connector = aiohttp.TCPConnector(limit=max(c for c, _ in steps) + 1)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        for k, (conc, seconds) in enumerate(steps):
            step_start = time.monotonic()
            step_end = step_start + seconds

            async def worker() -> None:
                while time.monotonic() < step_end:
                    query, docs = fresh.next()
                    t = time.monotonic()
                    try:
                        async with session.post("/v1/rerank", json=body_for("/v1/rerank", None, query, docs)) as r:
                            await r.read()
                            status = r.status
                    except Exception as e:  # noqa: BLE001 - every failure counts
                        status = type(e).__name__
                    records.append({"step": k, "start": t - t0, "end": time.monotonic() - t0,
                                    "status": status, "pairs": len(docs)})

            if conc:
                await asyncio.gather(*(worker() for _ in range(conc)))
            else:
                await asyncio.sleep(max(0.0, step_end - time.monotonic()))
            bounds.append((round(step_start - t0, 2), round(time.monotonic() - t0, 2)))


def poll_replicas(samples: list, t0: float, stop_flag: list) -> None:
    with httpx.Client() as c:
        while not stop_flag:
            t = time.monotonic()
            try:
                samples.append({"t": round(t - t0, 2), "deployments": replica_counts(c)})
            except (httpx.HTTPError, ValueError) as e:
                samples.append({"t": round(t - t0, 2), "error": str(e)})
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))


def summarize(steps, records, samples, step_bounds) -> dict:
    out_steps = []
    for k, (conc, _) in enumerate(steps):
        lo, hi = step_bounds[k]
        recs = [r for r in records if r["step"] == k]
        ok = [r for r in recs if r["status"] == 200]
        lat = np.array([r["end"] - r["start"] for r in ok]) if ok else np.array([np.nan])
        in_step = [s for s in samples if lo <= s["t"] < hi and "deployments" in s]
        before = next((s for s in reversed(samples) if s["t"] < lo and "deployments" in s), None)
        deps: dict = {}
        for s in in_step:
            for name, d in s["deployments"].items():
                e = deps.setdefault(name, {"min": d["running"], "max": d["running"], "first_change_s": None})
                e["min"] = min(e["min"], d["running"])
                e["max"] = max(e["max"], d["running"])
                start = (before or in_step[0])["deployments"].get(name, {}).get("running")
                if e["first_change_s"] is None and start is not None and d["running"] != start:
                    e["first_change_s"] = round(s["t"] - lo, 1)
        for name, e in deps.items():
            e["at_end"] = in_step[-1]["deployments"].get(name, {}).get("running") if in_step else None
        out_steps.append({
            "concurrency": conc, "seconds": round(hi - lo, 1), "requests_ok": len(ok),
            "errors": len(recs) - len(ok),
            "pairs_per_s": round(sum(r["pairs"] for r in ok) / max(hi - lo, 1e-9), 2),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
            "replicas": deps,
        })
    return {"steps": out_steps}


def timeline(records, samples, end: float, step: float = 2.0, window: float = 10.0) -> list[dict]:
    """Every ``step`` seconds: requests in flight, and pairs/s and p50 of requests that ended in the trailing
    ``window`` (a 32-document request is too coarse for 2-second rates)."""
    rows = []
    t = 0.0
    while t < end:
        lo = max(0.0, t + step - window)
        done = [r for r in records if lo <= r["end"] < t + step and r["status"] == 200]
        inflight = sum(1 for r in records if r["start"] <= t + step / 2 < r["end"])
        snap = next((s for s in reversed(samples) if s["t"] <= t + step and "deployments" in s), None)
        rows.append({
            "t": round(t, 1), "in_flight": inflight,
            "pairs_per_s": round(sum(r["pairs"] for r in done) / (t + step - lo), 1),
            "p50_s": round(float(np.median([r["end"] - r["start"] for r in done])), 2) if done else None,
            "running": {n: d["running"] for n, d in snap["deployments"].items()} if snap else {},
            "target": {n: d["target"] for n, d in snap["deployments"].items()} if snap else {},
        })
        t += step
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ts = [r["t"] for r in rows]
    a.plot(ts, [r["pairs_per_s"] for r in rows], label="pairs/s")
    a2 = a.twinx()
    a2.plot(ts, [r["in_flight"] for r in rows], "k:", label="requests in flight")
    a.set_ylabel("pairs / s")
    a2.set_ylabel("in flight")
    names = sorted({n for r in rows for n in r["running"]})
    for n in names:
        b.step(ts, [r["running"].get(n, 0) for r in rows], where="post", label=n)
    b.set_ylabel("running replicas")
    b.set_xlabel("seconds")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(loc="upper left", fontsize=7)
    a2.legend(loc="upper right", fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--steps", default="2:40,16:120,2:60,0:120", help="concurrency:seconds,...")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--doc-tokens", default="64,512")
    ap.add_argument("--scorer-autoscaling", default="", help="key=value,... overriding the scorer's autoscaling")
    ap.add_argument("--scorer", default="", help="key=value,... overriding other scorer fields "
                    "(max_ongoing_requests=8, cpu_forward_tokens=2048, ...)")
    ap.add_argument("--serve-mode", choices=sorted(SERVE_MODES), default="high-throughput")
    ap.add_argument("--out", default=str(RESULTS / "stepload.json"))
    args = ap.parse_args()
    steps = parse_steps(args.steps)
    lo, hi = (int(x) for x in args.doc_tokens.split(","))
    cell = Cell(docs_per_request=args.docs, doc_tokens=(lo, hi))
    RESULTS.mkdir(parents=True, exist_ok=True)
    ckpt = bench_checkpoint(args.tokenizer)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    fresh = FreshRequests(TextFactory(lambda s: len(tok.encode(s, add_special_tokens=False).ids), seed=7), cell)
    scorer_overrides = parse_overrides(args.scorer)
    cfg = stepload_config(ckpt, RESULTS / "serve_config.stepload.yaml", parse_overrides(args.scorer_autoscaling),
                          scorer_overrides)
    proc, haproxy_before = start_service(cfg, args.serve_mode, RESULTS / "stepload-service.log")
    records: list = []
    samples: list = []
    bounds: list = []
    stop_flag: list = []
    try:
        ready_s = wait_ready(f"http://127.0.0.1:{APP_PORT}/v1/health/ready", proc)
        print(f"service ready after {ready_s:.1f} s; steps {steps}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        poller = threading.Thread(target=poll_replicas, args=(samples, t0, stop_flag), daemon=True)
        poller.start()
        asyncio.run(run_load(f"http://127.0.0.1:{APP_PORT}", steps, fresh, records, t0, bounds))
        end = time.monotonic() - t0
        stop_flag.append(True)
        poller.join(5)
    finally:
        stop(proc, haproxy_before)
    applied = yaml.safe_load(cfg.read_text())["applications"][0]["args"]["models"][0]
    report = {
        "workload": {"docs_per_request": args.docs, "doc_tokens": args.doc_tokens, "steps": args.steps},
        "scorer_autoscaling": applied["scorer"].get("autoscaling"),
        "scorer_overrides": scorer_overrides,
        "preprocess_autoscaling": applied["preprocess"].get("autoscaling"),
        "cold_start_s": round(ready_s, 1),
        **summarize(steps, records, samples, bounds),
        "timeline": timeline(records, samples, end),
        "poll_errors": sum(1 for s in samples if "error" in s),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "timeline"}, indent=2))
    try:
        plot(report["timeline"], Path(args.out).with_suffix(".png"),
             f"step load {args.steps}; {args.docs} docs of {args.doc_tokens} tokens")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
