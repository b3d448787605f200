"""Where a CPU scorer loads its model matters: interleaved A/B of forward speed on a worker thread.

    python benchmarks/omp_threads.py --tokenizer ../shared/tokenizers/llama3 [--rounds 12] \
        [--background 2 --background-load 0.2]

The Serve scorer runs forward passes on a thread of its own (the replica's event loop stays free). torch's
OpenMP runtime (libgomp) gives every thread that runs parallel work a team of its own; once the teams
together hold more threads than the machine has CPUs, idle team workers spin about 100 times instead of
about 300,000 before they sleep, so between two parallel regions they go to sleep and must be woken.
This script starts two worker processes that differ in one thing:

* ``main``: the model is loaded on the process's main thread (which runs parallel work while loading),
  forward passes on a pool thread: two teams;
* ``forward``: the model is loaded on the pool thread that runs the forward passes: one team (what the
  scorer does).

Both run the same passes (12-document requests of 64-512 tokens, 4096-token passes, 2 torch threads),
taking turns round by round so the machine's drifting speed hits both alike. ``--background N`` adds N
processes that burn Python in short bursts (``--background-load`` of one core each), as Ray's and Serve's
helper processes do beside a replica. Prints tokens/s and voluntary context switches per second of each,
and the per-round ratio forward/main.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
sys.path[:0] = [HERE, REPO]
from workload import Cell, TextFactory
from rerank_core import load_reranker

mode, ckpt, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
pool = ThreadPoolExecutor(1, thread_name_prefix="forward")

def load():
    r = load_reranker(ckpt, device="cpu")
    r.max_batch_tokens = 4096
    return r

r = load() if mode == "main" else pool.submit(load).result()
factory = TextFactory(r.tokenizer.count_tokens, seed=5)
encs = [r.encode(*factory.request(Cell(12, (64, 512)))) for _ in range(4)]
tokens = sum(e.total_tokens for e in encs)

def switches():
    n = 0
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/status") as f:
            n += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return n

def run(es):
    t = time.perf_counter()
    for e in es:
        r.forward_encoded(e)
    return time.perf_counter() - t

pool.submit(run, encs[:1]).result()
print("ready", flush=True)
for _ in sys.stdin:
    s0 = switches()
    dt = pool.submit(run, encs).result()
    print(json.dumps({"tokens_per_s": tokens / dt, "switches_per_s": (switches() - s0) / dt}), flush=True)
"""

BACKGROUND = r"""
import pickle, sys, time
load = float(sys.argv[1])
burst = 0.003 * load / (1 - load)
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < burst:
        pickle.loads(pickle.dumps({"a": list(range(50))}))
    time.sleep(0.003)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--background", type=int, default=0, help="bursty background processes")
    ap.add_argument("--background-load", type=float, default=0.2, help="share of one core each burns")
    args = ap.parse_args()
    if not 0 < args.background_load < 1:
        ap.error("--background-load must be between 0 and 1")

    sys.path.insert(0, str(HERE))
    from compare import bench_checkpoint

    ckpt = str(bench_checkpoint(args.tokenizer))
    code = WORKER.replace("HERE, REPO", f"{str(HERE)!r}, {str(HERE.parent)!r}")
    workers = {
        mode: subprocess.Popen([sys.executable, "-c", code, mode, ckpt, str(args.threads)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for mode in ("main", "forward")
    }
    background: list[subprocess.Popen] = []
    results: dict[str, list[dict]] = {mode: [] for mode in workers}
    try:
        for mode, w in workers.items():
            if w.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {mode} worker did not start")
        background = [subprocess.Popen([sys.executable, "-c", BACKGROUND, str(args.background_load)])
                      for _ in range(args.background)]
        for i in range(args.rounds):
            for mode in ("main", "forward") if i % 2 == 0 else ("forward", "main"):
                workers[mode].stdin.write("go\n")
                workers[mode].stdin.flush()
                results[mode].append(json.loads(workers[mode].stdout.readline()))
    finally:
        for p in background + list(workers.values()):
            p.kill()
            p.wait()
    ratios = [f["tokens_per_s"] / m["tokens_per_s"] for f, m in zip(results["forward"], results["main"])]
    out = {
        "threads": args.threads,
        "background": args.background,
        "background_load": args.background_load if args.background else 0,
        **{f"{mode}_tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in rs))
           for mode, rs in results.items()},
        **{f"{mode}_switches_per_s_median": round(statistics.median(r["switches_per_s"] for r in rs))
           for mode, rs in results.items()},
        "forward_over_main_by_round": [round(x, 3) for x in ratios],
        "forward_over_main_median": round(statistics.median(ratios), 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
