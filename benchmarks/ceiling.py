"""In-process ceiling: the same model and threads as the service, best batching, no serving.

    python benchmarks/ceiling.py --checkpoint DIR --tokenizer ../shared/tokenizers/llama3 --requests 60

Generates the same kind of workload as loadgen.py (fresh texts), encodes every request, packs all pairs
of all requests together (one global length sort: the best packing there is) and runs them through the
model in forward passes of the size a CPU scorer uses (``cpu_forward_tokens``, 4096 tokens), split over
threads the way a CPU scorer splits them (``--threads`` in all, ``--threads-per-pass`` each, the passes
dealt to ``threads / threads-per-pass`` forward threads by ``PackPlan.deal``, each to the least-loaded
one). Prints pairs/s for the forward
passes alone and for encode + forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import Cell  # noqa: E402

from loadgen import make_requests  # noqa: E402
from deployments.config import ScorerArgs  # noqa: E402
from rerank_core import load_reranker  # noqa: E402

CPU_PASS_TOKENS = ScorerArgs().cpu_text_pass_tokens  # a CPU text scorer's forward passes
THREADS_PER_PASS = ScorerArgs.model_fields["cpu_threads_per_pass"].default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--doc-tokens", default="64,512")
    ap.add_argument("--query-words", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in all (default: torch's own)")
    ap.add_argument("--threads-per-pass", type=int, default=THREADS_PER_PASS,
                    help="torch threads per forward pass (default: the CPU scorer's cpu_threads_per_pass)")
    ap.add_argument("--max-batch-tokens", type=int, default=CPU_PASS_TOKENS,
                    help="tokens per forward pass (default: the CPU text scorer's, %(default)s)")
    ap.add_argument("--compile", action="store_true",
                    help="fused elementwise kernels, as a CPU scorer with compile: true (Reranker.fuse_elementwise)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    split = ScorerArgs(torch_threads=threads, cpu_threads_per_pass=args.threads_per_pass)  # as a CPU scorer does
    parallel = split.cpu_parallel_passes
    torch.set_num_threads(split.cpu_pass_threads)
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="forward")
    r = pool.submit(load_reranker, args.checkpoint, device="cpu", dtype=args.dtype,
                    max_batch_tokens=args.max_batch_tokens).result()
    if args.compile and not pool.submit(r.fuse_elementwise).result():
        raise SystemExit("--compile: the elementwise kernels did not compile (see the warning above)")
    lo, hi = (int(x) for x in args.doc_tokens.split(","))
    cell = Cell(docs_per_request=args.docs, doc_tokens=(lo, hi), query_words=args.query_words)
    reqs = make_requests(cell, args.requests, r.tokenizer.count_tokens, seed=args.seed)
    list(pool.map(lambda _: r.score(*reqs[0]), range(parallel)))  # warm up every forward thread
    t0 = time.perf_counter()
    rows = []
    for q, docs in reqs:
        enc = r.encode(q, docs)
        rows.extend(enc.pair(i) for i in range(len(enc.lengths)))
    t1 = time.perf_counter()
    plan = r.plan_rows(rows)
    # the passes, dealt to the forward threads, each to the least-loaded (a pass is what one scorer batch runs on CPU)
    shares = [[rows[i] for i in share] for share in plan.deal(parallel)]
    list(pool.map(r.forward_rows, shares))
    t2 = time.perf_counter()
    pairs = len(rows)
    print(json.dumps({
        "pairs": pairs,
        "tokens": int(sum(len(x) for x in rows)),
        "threads": threads,
        "parallel_passes": parallel,
        "padded_over_real": round(plan.padding_ratio, 3),
        "encode_s": round(t1 - t0, 2),
        "forward_s": round(t2 - t1, 2),
        "forward_pairs_per_s": round(pairs / (t2 - t1), 2),
        "pairs_per_s": round(pairs / (t2 - t0), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
