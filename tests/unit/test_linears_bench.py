"""benchmarks/linears.py: the shapes it times are the benchmark model's projections, and both kernels agree."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import linears  # noqa: E402
from packer import BENCH_SIZES  # noqa: E402

from rerank_core.tiny import make_tiny  # noqa: E402


def test_shapes_are_the_scorers_fused_projections(tmp_path):
    from rerank_core import load_reranker

    path = make_tiny("text", str(tmp_path / "ckpt"), sizes=BENCH_SIZES)
    layer = load_reranker(path, device="cpu").model.model.layers[0]
    got = linears.shapes()
    assert tuple(layer.self_attn.qkv_weight.shape) == got["qkv"][::-1]
    assert tuple(layer.self_attn.o_proj.weight.shape) == got["o"][::-1]
    assert tuple(layer.mlp.gate_up_weight.shape) == got["gate_up"][::-1]
    assert tuple(layer.mlp.down_proj.weight.shape) == got["down"][::-1]


def test_measure_times_both_kernels_on_every_shape():
    threads = torch.get_num_threads()
    try:
        out = linears.measure([8], reps=2)
    finally:
        torch.set_num_threads(threads)
    assert [r["shape"] for r in out] == list(linears.shapes())
    for r in out:
        assert r["mkl_gflops"] > 0 and r["onednn_prepacked_gflops"] > 0
        assert r["max_abs_diff"] < 1e-3
