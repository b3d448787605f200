"""torch's float32 linear (MKL's sgemm) against oneDNN with prepacked weights, one thread, the text model's shapes.

    python benchmarks/linears.py --rows 64,512,2048

vLLM-CPU runs its linears through oneDNN with weights packed once; torch's ``F.linear`` calls MKL's sgemm.
This times both on the benchmark checkpoint's four fused projections (qkv, o, gate/up, down; ``packer.BENCH_SIZES``)
at the given row counts (tokens in a pass) and prints GFLOP/s and the largest difference, one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from packer import BENCH_SIZES  # noqa: E402


def shapes(sizes=BENCH_SIZES) -> dict[str, tuple[int, int]]:
    """(in, out) of the model's fused projections, as the scorer runs them."""
    h, d = sizes.hidden, sizes.head_dim
    return {
        "qkv": (h, (sizes.heads + 2 * sizes.kv_heads) * d),
        "o": (sizes.heads * d, h),
        "gate_up": (h, 2 * sizes.intermediate),
        "down": (sizes.intermediate, h),
    }


def median_s(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def measure(row_counts: list[int], reps: int) -> list[dict]:
    """One result per row count and shape, printed as it comes (one thread)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = []
    for rows in row_counts:
        for name, (i, o) in shapes().items():
            x, w = torch.randn(rows, i), torch.randn(o, i)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=rows)

            def onednn(x=x, packed=packed):
                return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

            def mkl(x=x, w=w):
                return F.linear(x, w)

            flop = 2 * rows * i * o
            out.append({
                "rows": rows,
                "shape": name,
                "mkl_gflops": round(flop / median_s(mkl, reps) / 1e9, 1),
                "onednn_prepacked_gflops": round(flop / median_s(onednn, reps) / 1e9, 1),
                "max_abs_diff": float((mkl() - onednn()).abs().max()),
            })
            print(json.dumps(out[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64,512,2048", help="tokens in a pass, comma-separated")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    measure([int(r) for r in args.rows.split(",")], args.reps)


if __name__ == "__main__":
    main()
