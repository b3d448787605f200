"""In-process ceiling: the same model and threads as the service, best batching, no serving.

    python benchmarks/ceiling.py --checkpoint DIR --tokenizer ../shared/tokenizers/llama3 --requests 60

Generates the same kind of workload as loadgen.py (fresh texts), encodes every request, packs all pairs
of all requests together (one global length sort: the best packing there is) and runs them through the
model in forward passes of the size a CPU scorer uses (``cpu_forward_tokens``, 4096 tokens). Prints
pairs/s for the forward passes alone and for encode + forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import Cell  # noqa: E402

from loadgen import make_requests  # noqa: E402
from deployments.config import ScorerArgs  # noqa: E402
from rerank_core import load_reranker  # noqa: E402

CPU_PASS_TOKENS = ScorerArgs.model_fields["cpu_forward_tokens"].default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--doc-tokens", default="64,512")
    ap.add_argument("--query-words", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-batch-tokens", type=int, default=CPU_PASS_TOKENS,
                    help="tokens per forward pass (default: the CPU scorer's cpu_forward_tokens)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = load_reranker(args.checkpoint, device="cpu", dtype=args.dtype, max_batch_tokens=args.max_batch_tokens)
    lo, hi = (int(x) for x in args.doc_tokens.split(","))
    cell = Cell(docs_per_request=args.docs, doc_tokens=(lo, hi), query_words=args.query_words)
    reqs = make_requests(cell, args.requests, r.tokenizer.count_tokens, seed=args.seed)
    r.score(*reqs[0])  # warm up
    t0 = time.perf_counter()
    rows = []
    for q, docs in reqs:
        enc = r.encode(q, docs)
        rows.extend(enc.pair(i) for i in range(len(enc.lengths)))
    t1 = time.perf_counter()
    plan = r.plan_rows(rows)
    r.forward_rows(rows, plan=plan)
    t2 = time.perf_counter()
    pairs = len(rows)
    print(json.dumps({
        "pairs": pairs,
        "tokens": int(sum(len(x) for x in rows)),
        "threads": torch.get_num_threads(),
        "padded_over_real": round(plan.padding_ratio, 3),
        "encode_s": round(t1 - t0, 2),
        "forward_s": round(t2 - t1, 2),
        "forward_pairs_per_s": round(pairs / (t2 - t1), 2),
        "pairs_per_s": round(pairs / (t2 - t0), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
