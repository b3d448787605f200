"""The GPU run: parity on CUDA, in-process throughput of the real-size models, and the service on a GPU.

    python benchmarks/gpu.py --tokenizer ../shared/tokenizers/llama3 --vl-tokenizer ../shared/tokenizers/llama3-vl \
        --out benchmarks/results/gpu [--parts check,text,vl,attention,serve]

Parts (each writes ``OUT/PART.json``; a part that fails records its error and the others still run):

- ``check``: tiny random-weight checkpoints (text and VL, real tokenizers) scored on the CPU in float32 (the
  reference: the CPU path is what the test suite checks against an independent implementation) and on CUDA
  in float32 and bfloat16; a request scored in one pass against each pair alone; the packed path against
  the padded one. Also the real-size text model: CUDA bfloat16 against CPU float32 on a few pairs.
- ``text``: a random-weight checkpoint of the real text model's size (hidden 2048, 16 layers, 32/8 heads,
  head_dim 64, the 128k vocabulary; bfloat16 weights, 2.5 GB) in process: pairs/s, tokens/s and achieved
  TFLOP/s for each forward pass size (``max_batch_tokens``) and attention group size (``--group-tokens``),
  eager and with fused elementwise kernels (``compile``), one pass at a time as a scorer replica runs them,
  and a dense bf16 matmul for the card's reachable peak.
- ``vl``: the real-size VL model (SigLIP 1152x27 + projector + the same Llama): pages/s for 1920x1080 pages.
- ``attention``: attention alone over the groups of real passes, per kernel (cuDNN, math, memory-efficient with
  the K/V heads repeated, flash per sequence, varlen flash), on shapes never seen and again.
- ``serve``: first a 10-document request's latency in process (one at a time, as the latency target is
  stated), then ``serve run`` on the real-size text checkpoint for each ``--variants`` entry (scorer replicas,
  each on ``1/n`` of the GPU, and scorer fields to override) and the load generator against ``/v1/rerank``
  for each ``--serve-cells`` cell.

Needs a CUDA GPU (``--device cpu --small`` runs every part on tiny sizes on the CPU, to check the script). On
an H100 the first four parts took about 4 minutes with checkpoint building, and each service variant 3-4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from loadgen import make_requests  # noqa: E402
from projection import Decoder, siglip_flop_per_tile  # noqa: E402
from workload import Cell  # noqa: E402

from rerank_core import load_reranker  # noqa: E402
from rerank_core.tiny import TinySizes, make_tiny  # noqa: E402

REAL = TinySizes(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                 vision_hidden=1152, vision_layers=27, vision_heads=16, vision_intermediate=4304)
SMALL = TinySizes(hidden=256, layers=4, heads=4, kv_heads=1, head_dim=64, intermediate=1024,
                  vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128)
H100_BF16_PEAK = 989.0  # dense bf16 TFLOP/s, H100 SXM


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def checkpoint(out: Path, kind: str, tokenizer: str, sizes: TinySizes, dtype: str = "bfloat16") -> str:
    path = out / f"{kind}-{sizes.hidden}x{sizes.layers}"
    if not (path / "model.safetensors").exists():
        t0 = time.monotonic()
        make_tiny(kind, str(path), tokenizer=tokenizer, sizes=sizes, dtype=dtype)
        print(f"built {path} in {time.monotonic() - t0:.0f} s", flush=True)
    return str(path)


def rows_of(r, reqs) -> list[np.ndarray]:
    rows = []
    for q, docs in reqs:
        enc = r.encode(q, docs)
        rows.extend(enc.pair(i) for i in range(len(enc.lengths)))
    return rows


def decoder_of(r) -> Decoder:
    c = r.info.config
    c = getattr(c, "llm", c)
    return Decoder(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                   kv_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
                   intermediate=c.intermediate_size)


def flop_of(dec: Decoder, rows) -> float:
    return float(sum(len(x) * dec.flop_per_token(len(x)) for x in rows))


# ------------------------------------------------------------------------------------------------ check
def part_check(args) -> dict:
    dev = args.device
    out: dict = {}
    for kind, tok in (("text", args.tokenizer), ("vl", args.vl_tokenizer)):
        ckpt = checkpoint(args.out, kind, tok, TinySizes(), dtype="float32")
        ref = load_reranker(ckpt, device="cpu", dtype="float32")
        if kind == "text":
            reqs = make_requests(Cell(docs_per_request=12, doc_tokens=(8, 700), query_words=12), 3, ref.tokenizer.count_tokens, 3)
        else:
            from vl_preprocess import page

            reqs = [("which slide shows the revenue chart?",
                     [{"image": page(i), "text": "Q3 revenue"} for i in range(3)] + ["a text page", {"text": "more"}])]
        want = [np.asarray(ref.score(q, d), dtype=np.float64) for q, d in reqs]
        res: dict = {}
        for dtype in ("float32", "bfloat16"):
            r = load_reranker(ckpt, device=dev, dtype=dtype)
            got = [np.asarray(r.score(q, d), dtype=np.float64) for q, d in reqs]
            alone = [np.asarray([r.score(q, [x])[0] for x in d]) for q, d in reqs]
            err = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
            scale = max(float(np.max(np.abs(w))) for w in want)
            batched_vs_alone = max(float(np.max(np.abs(g - a))) for g, a in zip(got, alone))
            row = {"max_abs_err_vs_cpu_fp32": err, "max_abs_logit": scale,
                   "batched_vs_alone_max_abs": batched_vs_alone,
                   "rank_order_equal": all(list(np.argsort(-g)) == list(np.argsort(-w)) for g, w in zip(got, want))}
            if kind == "text":
                # the padded path (batching.pack: one padded tensor per micro-batch) against the packed one
                from rerank_core.batching import pack

                q, d = reqs[0]
                enc = r.encode(q, d)
                prs = [enc.pair(i) for i in range(len(enc.lengths))]
                packed = r.forward_rows(prs)
                padded = r.forward_rows(prs, plan=pack([len(x) for x in prs], 1 << 20))
                row["packed_vs_padded_max_abs"] = float(np.max(np.abs(packed - padded)))
            res[dtype] = row
        out[kind] = res
    if not args.small:
        # the real-size model: bf16 on the device against fp32 on the CPU (random weights, so only a bound)
        ckpt = checkpoint(args.out, "text", args.tokenizer, REAL)
        ref = load_reranker(ckpt, device="cpu", dtype="float32")
        reqs = make_requests(Cell(docs_per_request=8, doc_tokens=(16, 400), query_words=12), 1,
                             ref.tokenizer.count_tokens, 5)
        want = np.asarray(ref.score(*reqs[0]))
        del ref
        r = load_reranker(ckpt, device=dev, dtype="bfloat16")
        got = np.asarray(r.score(*reqs[0]))
        out["text_real_size_bf16"] = {"max_abs_err_vs_cpu_fp32": float(np.max(np.abs(got - want))),
                                      "logit_std": float(np.std(want)),
                                      "spearman_like_rank_equal": list(np.argsort(-got)) == list(np.argsort(-want))}
        del r
    return out


# ------------------------------------------------------------------------------------------------ text
def matmul_peak(dev: str) -> float | None:
    if not dev.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(dev)
    return round(10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12, 1)


def bench_dtype(dev: str) -> str:
    """What the timed parts run in: bf16 on CUDA, float32 on a CPU (``--device cpu --small``)."""
    return "bfloat16" if dev.startswith("cuda") else "float32"


def part_model(args, kind: str, tokenizer: str) -> tuple:
    """(sizes, reranker, decoder) of a timed part: the benchmark checkpoint of ``kind`` (the real sizes, or
    SMALL with ``--small``) loaded on ``args.device`` in ``bench_dtype``."""
    sizes = SMALL if args.small else REAL
    r = load_reranker(checkpoint(args.out, kind, tokenizer, sizes), device=args.device, dtype=bench_dtype(args.device))
    return sizes, r, decoder_of(r)


def timed_passes(r, rows, repeat: int, dev: str, tiles=None) -> float:
    """Best seconds of ``repeat`` runs over all ``rows`` (and their image ``tiles``, VL model), planned as a
    scorer plans a batch, one pass at a time."""
    plan = r.plan_rows(rows, tiles)
    best = float("inf")
    for _ in range(repeat):
        sync(dev)
        t0 = time.perf_counter()
        r.forward_rows(rows, tiles, plan=plan)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def part_text(args) -> dict:
    dev = args.device
    sizes, r, dec = part_model(args, "text", args.tokenizer)
    out: dict = {"model": f"hidden {sizes.hidden}, {sizes.layers} layers", "device": dev,
                 "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None,
                 "matmul_bf16_tflops": matmul_peak(dev), "cells": []}
    n_req = 4 if args.small else args.text_requests
    cells = [Cell(32, (64, 512), 20), Cell(10, (32, 256), 20), Cell(16, (512, 1900), 20), Cell(64, (16, 64), 12)]
    data = {}
    for cell in cells:
        reqs = make_requests(cell, n_req, r.tokenizer.count_tokens, seed=11)
        data[cell] = rows_of(r, reqs)
    # the padded kernel ceiling: 32 rows of 512 tokens in one padded forward
    ids = torch.randint(1000, 100000, (32, 512), device=r.device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(2):
            r.model(ids, mask)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(5):
            r.model(ids, mask)
        sync(dev)
    dense_s = (time.perf_counter() - t0) / 5
    out["dense_32x512_tflops"] = round(32 * 512 * dec.flop_per_token(512) / dense_s / 1e12, 1)
    out["dense_32x512_tokens_per_s"] = round(32 * 512 / dense_s)
    for variant in ("eager", "fused"):
        if variant == "fused":
            t0 = time.monotonic()
            ok = r.fuse_elementwise()
            out["fuse_elementwise"] = {"ok": ok, "compile_s": round(time.monotonic() - t0, 1)}
            if not ok:
                break
        for cell, rows in data.items():
            tokens = int(sum(len(x) for x in rows))
            flop = flop_of(dec, rows)
            default_group = r.attention_group_tokens
            runs = [(b, default_group) for b in (args.budgets if variant == "eager" else [16384])]
            runs += [(16384, g) for g in args.group_tokens]
            for budget, group in runs:
                r.max_batch_tokens, r.attention_group_tokens = budget, group
                timed_passes(r, rows[: max(1, len(rows) // 8)], 1, dev)  # warm up these shapes
                s = timed_passes(r, rows, 2, dev)
                row = {"variant": variant, "docs": cell.docs_per_request, "doc_tokens": list(cell.doc_tokens),
                       "max_batch_tokens": budget, "attention_group_tokens": group, "pairs": len(rows),
                       "tokens": tokens, "pairs_per_s": round(len(rows) / s, 1), "tokens_per_s": round(tokens / s),
                       "tflops": round(flop / s / 1e12, 1), "mfu_h100": round(flop / s / 1e12 / H100_BF16_PEAK, 3)}
                out["cells"].append(row)
                print(json.dumps(row), flush=True)
            r.attention_group_tokens = default_group
    if dev.startswith("cuda"):
        out["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# ------------------------------------------------------------------------------------------------ vl
def part_vl(args) -> dict:
    from vl_preprocess import page

    dev = args.device
    _, r, dec = part_model(args, "vl", args.vl_tokenizer)
    n = 4 if args.small else args.vl_pages
    pages = [page(i) for i in range(min(n, 8))]
    t0 = time.perf_counter()
    enc = r.encode("which slide shows the revenue chart?", [{"image": pages[i % len(pages)]} for i in range(n)])
    encode_s = time.perf_counter() - t0
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    tiles = [enc.pair_tiles(i) for i in range(len(enc.lengths))]
    out: dict = {"pages": n, "tiles_per_page": int(enc.num_tiles[0]), "tokens_per_page": len(rows[0]),
                 "encode_pages_per_s_one_thread": round(n / encode_s, 1), "runs": []}
    for max_tiles in args.vl_tiles:
        r.max_batch_tiles = max_tiles
        r.forward_rows(rows[:2], tiles[:2])
        best = timed_passes(r, rows, 2, dev, tiles)
        flop = flop_of(dec, rows) + (0 if args.small else int(enc.num_tiles.sum()) * siglip_flop_per_tile())
        row = {"max_batch_tiles": max_tiles, "pages_per_s": round(n / best, 2), "tflops": round(flop / best / 1e12, 1),
               "mfu_h100": round(flop / best / 1e12 / H100_BF16_PEAK, 3)}
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    if dev.startswith("cuda"):
        out["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# ------------------------------------------------------------------------------------------------ attention
def part_attention(args) -> dict:
    """Attention alone over the groups of real passes (32 documents of 64-512 tokens plus a query, packed as a GPU
    scorer packs them: 16k-token passes, 4096-token attention groups), per kernel: cuDNN (grouped heads and the
    padding mask, as torch picks by default on an H100), math, memory-efficient with the K/V heads repeated (what
    ``grouped_attention`` does on CUDA), flash on each sequence alone (no padding, no mask) and varlen flash over
    the packed tokens. ``fresh``: group shapes never run before (cuDNN builds a plan per shape); ``seen``: the
    same again."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rerank_core.batching import pack_varlen
    from rerank_core.models.llama_bidirectional import grouped_attention

    dev = args.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    nh, nkv, d = (4, 1, 64) if args.small else (32, 8, 64)
    n_seq = 64 if args.small else 512
    rng = np.random.default_rng(1)

    def groups() -> list[list[int]]:
        lengths = [int(x) for x in rng.integers(90, 560, n_seq)]
        plan = pack_varlen(lengths, 16384, 4096)
        return [[lengths[i] for i in plan.batches[k].indices] for p in plan.passes for k in p]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dtype)

    def padded_inputs(gs):
        out = []
        for lens in gs:
            b, longest = len(lens), max(lens)
            valid = torch.arange(longest, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
            out.append((rand(b, nh, longest, d), rand(b, nkv, longest, d), rand(b, nkv, longest, d),
                        valid[:, None, None, :]))
        return out

    def padded(backends, repeat):
        def run(inputs):
            with sdpa_kernel(backends):
                for q, k, v, mask in inputs:
                    grouped_attention(q, k, v, mask, d**-0.5, repeat_kv=repeat)
        return padded_inputs, run

    def per_sequence_inputs(gs):
        return [(rand(1, nh, n, d), rand(1, nkv, n, d), rand(1, nkv, n, d)) for lens in gs for n in lens]

    def per_sequence(inputs):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for q, k, v in inputs:
                torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=d**-0.5, enable_gqa=nkv != nh)

    def varlen_inputs(gs):
        out = []
        for lens in gs:
            t = sum(lens)
            cu = torch.tensor(np.concatenate(([0], np.cumsum(lens))), device=dev, dtype=torch.int32)
            out.append((rand(t, nh, d), rand(t, nkv, d), rand(t, nkv, d), cu, max(lens)))
        return out

    def varlen(inputs):
        from torch.nn.attention.varlen import varlen_attn

        for q, k, v, cu, longest in inputs:
            varlen_attn(q, k, v, cu, cu, longest, longest, scale=d**-0.5, enable_gqa=nkv != nh)

    variants = {
        "cudnn_gqa_mask": padded([SDPBackend.CUDNN_ATTENTION], False),
        "math_gqa_mask": padded([SDPBackend.MATH], False),
        "efficient_repeat_kv_mask": padded([SDPBackend.EFFICIENT_ATTENTION], True),
        "flash_per_sequence": (per_sequence_inputs, per_sequence),
        "varlen_flash": (varlen_inputs, varlen),
    }
    out: dict = {"heads": [nh, nkv, d], "sequences_per_set": n_seq, "runs": []}
    for name, (prepare, fn) in variants.items():
        row: dict = {"variant": name}
        gs = groups()  # new shapes for this kernel ("fresh"), then the same again ("seen")
        try:
            fn(prepare([[33, 17]]))  # first-call costs (module loading, handles) out of the timing
            inputs = prepare(gs)
            tokens = sum(sum(g) for g in gs)
            flop = sum(4 * n * n * nh * d for g in gs for n in g)  # QK^T and AV over real tokens
            for phase in ("fresh", "seen"):
                sync(dev)
                t0 = time.perf_counter()
                fn(inputs)
                sync(dev)
                secs = time.perf_counter() - t0
                row[phase] = {"ms": round(secs * 1e3, 2), "tokens": tokens, "tflops_real": round(flop / secs / 1e12, 2)}
        except Exception as e:  # noqa: BLE001 - a kernel this device or torch lacks is a result too
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    return out


# ------------------------------------------------------------------------------------------------ serve
def in_process_latency(args, ckpt: str, n: int = 40) -> dict:
    """p50/p95 of fresh 10-document requests (32-256 tokens) scored one at a time in this process, with the
    scorer's default kernels (``--in-process-compile``: fused, as ``compile: true``); the GPU memory is given
    back before the service starts."""
    dev = args.device
    r = load_reranker(ckpt, device=dev, dtype=bench_dtype(dev))
    fused = bool(args.in_process_compile) and r.fuse_elementwise()
    reqs = make_requests(Cell(10, (32, 256), 20), n + 5, r.tokenizer.count_tokens, seed=23)
    lat = []
    for i, (q, docs) in enumerate(reqs):
        t0 = time.perf_counter()
        r.score(q, docs)
        if i >= 5:
            lat.append(time.perf_counter() - t0)
    del r
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"requests": n, "fused_elementwise": bool(fused), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
            "p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 2)}


def part_serve(args) -> dict:
    import yaml

    from compare import loadgen, parse_overrides, start_service, stop, text_only_config, wait_ready

    sizes = SMALL if args.small else REAL
    ckpt = checkpoint(args.out, "text", args.tokenizer, sizes)
    out: dict = {"runs": [], "in_process_10_docs": in_process_latency(args, ckpt)}
    for variant in args.variants:
        replicas, _, extra = variant.partition(":")
        replicas = int(replicas)
        port = 18300
        cfg, app, text = text_only_config(Path(ckpt), port)
        app["accelerator"] = "auto"
        for part in (text["preprocess"], app["ingress"]):
            part.pop("autoscaling", None)
            part["num_replicas"] = args.cpu_replicas
        text["scorer"].pop("autoscaling", None)
        text["scorer"]["num_replicas"] = replicas
        text["scorer"]["num_gpus"] = round(1.0 / replicas, 4)
        text["scorer"].update(parse_overrides(extra))
        tag = variant.replace(":", "-").replace("=", "").replace(",", "-")
        path = args.out / f"serve_config.{tag}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc, before = start_service(path, args.serve_mode, args.out / f"service-{tag}.log")
        try:
            ready_s = wait_ready(f"http://127.0.0.1:{port}/v1/health/ready", proc, timeout=600)
            for docs, lo_hi, conc in args.serve_cells:
                ns = argparse.Namespace(tokenizer=args.tokenizer, docs=docs, doc_tokens=lo_hi, query_words=20,
                                        concurrency=conc, duration=args.duration,
                                        max_requests=min(6000, max(200, args.max_pairs // docs)))
                res = loadgen(f"http://127.0.0.1:{port}", "/v1/rerank", "nvidia/llama-nemotron-rerank-1b-v2", ns,
                              f"gpu-{tag}-{docs}d-c{conc}")
                for row in res["results"]:
                    row.update({"variant": variant, "docs": docs, "doc_tokens": lo_hi,
                                "cold_start_s": round(ready_s, 1)})
                    out["runs"].append(row)
                    (args.out / "serve.partial.json").write_text(json.dumps(out, indent=2))
                    print(json.dumps({k: row.get(k) for k in ("variant", "docs", "doc_tokens", "concurrency",
                                      "pairs_per_s", "steady_pairs_per_s", "p50_s", "p99_s", "errors")}), flush=True)
        finally:
            stop(proc, before)
    return out


PARTS = {"check": part_check, "text": part_text, "vl": part_vl, "attention": part_attention, "serve": part_serve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--vl-tokenizer", required=True)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    ap.add_argument("--parts", default="check,text,vl,attention,serve")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes and workloads (to check the script on a CPU)")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384, 32768],
                    help="forward pass sizes (max_batch_tokens) to time")
    ap.add_argument("--group-tokens", type=lambda s: [int(x) for x in s.split(",") if x], default=[16],
                    help="attention_group_tokens to time besides the default, at 16k-token passes (16: one sequence "
                         "per group, so no mask: flash with grouped heads on CUDA)")
    ap.add_argument("--text-requests", type=int, default=16, help="requests per text cell")
    ap.add_argument("--vl-pages", type=int, default=48)
    ap.add_argument("--vl-tiles", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 128])
    ap.add_argument("--in-process-compile", action="store_true",
                    help="fused elementwise kernels for the in-process 10-document latency (as compile: true)")
    ap.add_argument("--variants", type=lambda s: s.split(";"), default=["1", "2", "1:compile=true"],
                    help="service variants, ';'-separated: scorer replicas, then ':' and scorer overrides k=v,...")
    ap.add_argument("--cpu-replicas", type=int, default=4, help="ingress and preprocess replicas each")
    ap.add_argument("--serve-cells", type=lambda s: [(int(a), b.replace("-", ","), c) for a, b, c in
                                                     (x.split(":") for x in s.split(";"))],
                    default=[(32, "64,512", "1,16,64"), (10, "32,256", "1,16"), (1, "16,64", "64")],
                    help="docs:lo-hi:concurrencies;... e.g. 32:64-512:1,16,64")
    ap.add_argument("--serve-mode", default="high-throughput", choices=["default", "high-throughput"])
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--max-pairs", type=int, default=24000, help="pairs generated per load generator run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.small:
        args.budgets, args.vl_tiles = args.budgets[:2], args.vl_tiles[:1]
    summary = {}
    for name in args.parts.split(","):
        t0 = time.monotonic()
        try:
            res = PARTS[name](args)
        except Exception as e:  # noqa: BLE001 - a failed part is recorded; the others still run
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.monotonic() - t0, 1)
        (args.out / f"{name}.json").write_text(json.dumps(res, indent=2))
        summary[name] = res
        print(f"== {name} done in {res['seconds']} s", flush=True)
    print(json.dumps(summary, indent=1)[-6000:])


if __name__ == "__main__":
    main()
