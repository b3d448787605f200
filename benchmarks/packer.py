"""In-process CPU throughput: length-sorted token-budget packing vs padding each batch of 32 to its longest.

    python benchmarks/packer.py --tokenizer ../shared/tokenizers/llama3 [--pairs 512]

Builds (once) a random-weight checkpoint in the published text layout (hidden 256, 4 layers, head_dim 64,
the real tokenizer), tokenizes a mixed-length workload (64-1024 tokens per pair), and times both ways of
batching the same pairs through the same model. Prints pairs/s and the padded/real token ratio of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import TextFactory  # noqa: E402

from rerank_core import load_reranker  # noqa: E402
from rerank_core.batching import pack, pad_ids  # noqa: E402
from rerank_core.tiny import TinySizes, make_tiny  # noqa: E402

BENCH_SIZES = TinySizes(hidden=256, layers=4, heads=4, kv_heads=1, head_dim=64, intermediate=1024)


def bench_checkpoint(path: str, tokenizer: str | None) -> str:
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        make_tiny("text", path, tokenizer=tokenizer, sizes=BENCH_SIZES)
    return path


def run_batches(r, rows, batches) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for idx in batches:
            ids, mask = pad_ids([rows[i] for i in idx], r.pad_id)
            r.model(torch.from_numpy(ids), torch.from_numpy(mask))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--checkpoint", default="benchmarks/results/bench-text-256x4")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = bench_checkpoint(args.checkpoint, args.tokenizer)
    r = load_reranker(path, device="cpu")
    f = TextFactory(r.tokenizer.count_tokens, seed=1)
    rng = np.random.default_rng(0)
    targets = rng.integers(args.min_tokens, args.max_tokens + 1, size=args.pairs)
    query = f.words(12)
    docs = [f.text_of_tokens(int(t)) for t in targets]
    enc = r.encode(query, docs)
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    lengths = enc.lengths.astype(int)
    real = int(lengths.sum())

    naive = [list(range(i, min(i + 32, len(rows)))) for i in range(0, len(rows), 32)]
    naive_padded = sum(max(lengths[j] for j in b) * len(b) for b in naive)
    plan = pack(lengths.tolist(), args.budget)
    packed = [list(b.indices) for b in plan.batches]

    run_batches(r, rows, packed[:1])  # warm up
    results = {}
    for name, batches, padded in (("pad-32-to-longest", naive, naive_padded), ("sorted-token-budget", packed,
                                                                               plan.padded_tokens)):
        secs = run_batches(r, rows, batches)
        results[name] = {
            "pairs_per_s": round(len(rows) / secs, 2),
            "seconds": round(secs, 2),
            "batches": len(batches),
            "padded_over_real": round(padded / real, 3),
        }
    out = {
        "model": "hidden 256, 4 layers, head_dim 64, real tokenizer" if args.tokenizer else "hidden 256, 4 layers",
        "pairs": len(rows),
        "tokens_real": real,
        "token_range": [int(lengths.min()), int(lengths.max())],
        "threads": torch.get_num_threads(),
        "budget": args.budget,
        **results,
        "speedup": round(results["sorted-token-budget"]["pairs_per_s"] / results["pad-32-to-longest"]["pairs_per_s"],
                         2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
