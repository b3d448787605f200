"""Async HTTP load generator for rerank servers (this service or vLLM), with fresh texts on every request.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --route /v1/rerank --model M \\
        --tokenizer ../shared/tokenizers/llama3 --concurrency 1,4,16 --duration 60 --out results/svc.json

A workload cell fixes the query length, the document length range (tokens, measured with the real
tokenizer), documents per request, concurrency and duration. Every request carries a new query and new
documents (a serial number makes each text unique), so no cache helps either side. Requests are made
before the clock starts (bodies serialized too), so generating them costs the servers nothing. The client is
aiohttp with one kept-alive connection per worker: about 0.1 ms of CPU per request, where httpx took 1.2 ms at
concurrency 16 and 2.7 ms at 64 (a third of this 2-core machine at 64, taken from the server under test).
Prints and writes JSON; with --plot, also a PNG of throughput and p50/p95/p99 latency against concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from dataclasses import asdict

import aiohttp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_split import snapshot, split  # noqa: E402
from workload import Cell, TextFactory  # noqa: E402


def make_requests(cell: Cell, n: int, count_tokens, seed: int) -> list[tuple[str, list[str]]]:
    f = TextFactory(count_tokens, seed=seed)
    return [f.request(cell) for _ in range(n)]


def body_for(route: str, model: str | None, query: str, docs: list[str]) -> dict:
    if route.endswith("/ranking"):
        return {"model": model, "query": {"text": query}, "passages": [{"text": d} for d in docs]}
    if route.endswith("/score"):
        return {"model": model, "text_1": query, "text_2": docs}
    return {"model": model, "query": query, "documents": docs}


async def run_cell(
    url: str, route: str, model: str | None, requests: list, concurrency: int, duration: float, timeout: float,
    headers: dict | None = None, trace: bool = False, cpu: bool = False,
) -> dict:
    """Closed loop: ``concurrency`` workers send requests back to back for ``duration`` s (the last ones are
    waited for). ``trace``: the result also lists every request as [sent (s after the start), latency (s),
    documents, HTTP status or error name].

    ``pairs_per_s`` counts every pair over the whole run, the ramp-up and the drain (the last requests, with
    fewer than ``concurrency`` in flight) included; ``steady_pairs_per_s`` counts the pairs of requests that
    finished in the last three quarters of ``duration`` (full concurrency, past the start). ``cpu``: the result
    also has ``cpu_cores``, the cores each kind of process on this machine used over that same window
    (``cpu_split``)."""
    latencies: list[float] = []
    finished: list[tuple[float, int]] = []  # (finish time after the start, pairs) of successful requests
    sent: list[list] = []
    errors: dict[str, int] = {}
    pairs = 0
    next_index = 0
    stop_at = start = 0.0
    ran_out_at: float | None = None  # when the last generated request was sent, if before the clock ran out

    def encoded(query: str, docs: list[str]) -> bytes:
        return json.dumps(body_for(route, model, query, docs)).encode()

    bodies = [(len(docs), encoded(query, docs)) for query, docs in requests]
    # the prepared bodies (thousands of objects) made the client's own full collections take 11-74 ms during a
    # run, added to whichever request was in flight: move them out of the collector's reach
    gc.collect()
    gc.freeze()
    post_headers = {**(headers or {}), "Content-Type": "application/json"}

    async def post(session: aiohttp.ClientSession, body: bytes) -> int:
        async with session.post(route, data=body, headers=post_headers) as r:
            await r.read()  # the whole answer, as a client would
            return r.status

    async def cpu_window() -> dict[str, float]:
        await asyncio.sleep(duration / 4)
        a, t_a = await asyncio.to_thread(snapshot), time.monotonic()
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        b, t_b = await asyncio.to_thread(snapshot), time.monotonic()
        return split(a, b, t_b - t_a)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal pairs, next_index, ran_out_at
        while time.monotonic() < stop_at and next_index < len(bodies):
            n_docs, body = bodies[next_index]
            next_index += 1
            if next_index == len(bodies):
                ran_out_at = time.monotonic()
            t0 = time.monotonic()
            try:
                status = await post(session, body)
                ok, key = status == 200, str(status)
            except Exception as e:  # noqa: BLE001 - count every failure kind
                ok, key = False, type(e).__name__
            done = time.monotonic()
            if trace:
                sent.append([round(t0 - start, 3), round(done - t0, 3), n_docs, key])
            if ok:
                latencies.append(done - t0)
                finished.append((done - start, n_docs))
                pairs += n_docs
            else:
                errors[key] = errors.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        # one warm-up request outside the clock
        warm_q, warm_d = requests[-1]
        await post(session, encoded(warm_q, warm_d[:2]))
        start = time.monotonic()
        stop_at = start + duration
        sampler = asyncio.create_task(cpu_window()) if cpu else None
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - start
        cpu_cores = await sampler if sampler is not None else None
    gc.unfreeze()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    ran_out = ran_out_at is not None  # set only while the clock was still running
    if ran_out:
        print(f"warning: all {len(requests)} generated requests were sent {ran_out_at - start:.1f} s into a "
              f"{duration:g}-s run; the rest of the run had fewer than {concurrency} in flight: raise "
              "--max-requests", file=sys.stderr)
    out = {
        "concurrency": concurrency,
        "requests_ok": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "pairs_per_s": round(pairs / elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "steady_pairs_per_s": round(sum(n for t, n in finished if duration / 4 <= t < duration) / (0.75 * duration), 2),
        "p50_s": round(float(np.percentile(lat, 50)), 3),
        "p95_s": round(float(np.percentile(lat, 95)), 3),
        "p99_s": round(float(np.percentile(lat, 99)), 3),
        "ran_out_of_requests": ran_out,
    }
    if cpu_cores is not None:
        out["cpu_cores"] = cpu_cores
    if trace:
        out["requests"] = sorted(sent)
    return out


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in results:
        xs = [r["concurrency"] for r in rows]
        a.plot(xs, [r["pairs_per_s"] for r in rows], marker="o", label=label)
        for q, style in (("p50_s", "-"), ("p95_s", "--"), ("p99_s", ":")):
            b.plot(xs, [r[q] for r in rows], style, marker="o", label=f"{label} {q[:3]}")
    a.set_xlabel("concurrency")
    a.set_ylabel("pairs / s")
    a.set_title("throughput")
    b.set_xlabel("concurrency")
    b.set_ylabel("latency (s)")
    b.set_title("latency")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--route", default="/v1/rerank")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (to size the texts)")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--doc-tokens", default="64,512")
    ap.add_argument("--query-words", type=int, default=12)
    ap.add_argument("--concurrency", default="16")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-requests", type=int, default=400, help="requests generated per concurrency level")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--trace", action="store_true",
                    help="list every request in the JSON result: [sent s, latency s, documents, status]")
    ap.add_argument("--cpu", action="store_true",
                    help="add cpu_cores: cores used per kind of process on this machine in the steady window")
    args = ap.parse_args()

    from rerank_core.tokenization import PromptTokenizer

    tok = PromptTokenizer(args.tokenizer)
    lo, hi = (int(x) for x in args.doc_tokens.split(","))
    cell = Cell(docs_per_request=args.docs, doc_tokens=(lo, hi), query_words=args.query_words)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    rows = []
    for k, c in enumerate(int(x) for x in args.concurrency.split(",")):
        reqs = make_requests(cell, args.max_requests, tok.count_tokens, seed=args.seed * 1000 + k)
        res = asyncio.run(run_cell(args.url, args.route, args.model, reqs, c, args.duration, args.timeout, headers,
                                   trace=args.trace, cpu=args.cpu))
        print(json.dumps({k: v for k, v in res.items() if k != "requests"}), flush=True)
        rows.append(res)
    out = {"url": args.url, "route": args.route, "cell": asdict(cell), "duration_s": args.duration, "results": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    if args.plot:
        plot([(args.url + args.route, rows)], args.plot, f"{args.docs} docs/request, {lo}-{hi} tokens")


if __name__ == "__main__":
    main()
