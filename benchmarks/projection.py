"""FLOP per pair of the real models, and what that projects to on one GPU at a stated utilisation.

    python benchmarks/projection.py [--doc-tokens 300] [--tiles 7] [--utilisation 0.25 0.4 0.55]
    python benchmarks/projection.py --cpu-tokens-per-s 16000     # anchor: what the CPU runs achieve

The GPU figures are a projection (the one GPU run so far, on an H100, is in benchmarks/README.md): matmul
FLOP counted from the published configs (2 FLOP per weight per token, plus QK^T and AV), divided into the
GPU's dense bf16 peak times an assumed utilisation. ``--cpu-tokens-per-s`` turns a throughput measured on
the CPU benchmark checkpoint (hidden 256, 4 layers, head_dim 64) into achieved GFLOP/s the same way, as a
check that the FLOP model and the measured numbers agree. On a GPU, ``benchmarks/gpu.py`` measures the real thing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Decoder:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def flop_per_token(self, seq_len: int) -> float:
        """Forward FLOP of one token in a sequence of ``seq_len`` (bidirectional: attends to all of it)."""
        h, qd, kvd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        weights = h * qd + 2 * h * kvd + qd * h + 3 * h * self.intermediate
        attention = 2 * 2 * seq_len * qd  # QK^T and AV
        return self.layers * (2 * weights + attention)


# published configs (../shared/spec/models.md)
LLAMA_1B = Decoder(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192)
SIGLIP = Decoder(hidden=1152, layers=27, heads=16, kv_heads=16, head_dim=72, intermediate=4304)  # MLP: 2 mats
CPU_BENCH = Decoder(hidden=256, layers=4, heads=4, kv_heads=1, head_dim=64, intermediate=1024)

PATCHES_PER_TILE = (512 // 16) ** 2  # 1024
TOKENS_PER_TILE = 256  # after the 0.5 pixel shuffle


def siglip_flop_per_tile() -> float:
    d = SIGLIP
    weights = 4 * d.hidden * d.hidden + 2 * d.hidden * d.intermediate  # q, k, v, o; fc1, fc2 (no gate)
    attention = 2 * 2 * PATCHES_PER_TILE * d.hidden
    encoder = PATCHES_PER_TILE * d.layers * (2 * weights + attention)
    projector = TOKENS_PER_TILE * 2 * (4 * d.hidden * LLAMA_1B.hidden + LLAMA_1B.hidden * LLAMA_1B.hidden)
    return encoder + projector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--query-tokens", type=int, default=20)
    ap.add_argument("--doc-tokens", type=int, default=300, help="mean passage tokens (CPU bench mix: 64-512)")
    ap.add_argument("--tiles", type=int, default=7, help="tiles per page image (1920x1080: 6 + thumbnail)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--utilisation", type=float, nargs="+", default=[0.25, 0.40, 0.55])
    ap.add_argument("--cpu-tokens-per-s", type=float, default=None)
    args = ap.parse_args()

    text_len = args.query_tokens + args.doc_tokens + 8  # template and BOS
    text_pair = text_len * LLAMA_1B.flop_per_token(text_len)
    vl_len = args.tiles * TOKENS_PER_TILE + 2 + args.query_tokens + 10
    vl_doc = vl_len * LLAMA_1B.flop_per_token(vl_len) + args.tiles * siglip_flop_per_tile()
    out: dict = {
        "text_pair_tokens": text_len,
        "text_pair_gflop": round(text_pair / 1e9, 1),
        "text_gflop_per_token": round(LLAMA_1B.flop_per_token(text_len) / 1e9, 3),
        "vl_image_doc_tokens": vl_len,
        "vl_image_doc_tflop": round(vl_doc / 1e12, 2),
        "vl_vision_share": round(args.tiles * siglip_flop_per_tile() / vl_doc, 2),
        "gpu_peak_tflops": args.peak_tflops,
        "projection": [
            {
                "utilisation": u,
                "text_tokens_per_s": round(args.peak_tflops * 1e12 * u / LLAMA_1B.flop_per_token(text_len)),
                "text_pairs_per_s": round(args.peak_tflops * 1e12 * u / text_pair),
                "vl_image_docs_per_s": round(args.peak_tflops * 1e12 * u / vl_doc, 1),
            }
            for u in args.utilisation
        ],
    }
    if args.cpu_tokens_per_s:
        cpu_len = 20 + 288 + 8  # the CPU bench mix: passages of 64-512 tokens
        out["cpu_bench_gflop_per_token"] = round(CPU_BENCH.flop_per_token(cpu_len) / 1e9, 4)
        out["cpu_bench_achieved_gflops"] = round(args.cpu_tokens_per_s * CPU_BENCH.flop_per_token(cpu_len) / 1e9, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
