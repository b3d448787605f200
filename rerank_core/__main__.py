"""Command line: ``python -m rerank_core {score,rerank,make-tiny}``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import RerankError


def _documents(args: argparse.Namespace) -> list:
    docs: list = list(args.doc or [])
    for path in args.image or []:
        docs.append({"image": path})
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rerank_core", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    for name in ("score", "rerank"):
        p = sub.add_parser(name, help=f"{name} documents for a query with a local or hub checkpoint")
        p.add_argument("--model", required=True, help="checkpoint directory or hub id")
        p.add_argument("--query", required=True)
        p.add_argument("--doc", action="append", help="a text document (repeat for more)")
        p.add_argument("--image", action="append", help="an image file as a document (VL model; repeat)")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default=None)
        p.add_argument("--max-length", type=int, default=None)
        p.add_argument("--truncate", default="END", choices=["END", "NONE", "CHUNK"])
        if name == "rerank":
            p.add_argument("--top-n", type=int, default=None)

    t = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the published layout")
    t.add_argument("--kind", choices=["text", "vl"], default="text")
    t.add_argument("--out", required=True)
    t.add_argument("--tokenizer", default=None, help="directory with a real tokenizer.json (default: build one)")
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--head-dim", type=int, default=16)
    t.add_argument("--intermediate", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    t.add_argument("--temperature", type=float, default=0.2, help="config temperature (text kind)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "make-tiny":
            from .tiny import TinySizes, make_tiny

            sizes = TinySizes(
                hidden=args.hidden,
                layers=args.layers,
                heads=args.heads,
                kv_heads=args.kv_heads,
                head_dim=args.head_dim,
                intermediate=args.intermediate,
            )
            out = make_tiny(args.kind, args.out, args.tokenizer, sizes, args.seed, args.dtype, args.temperature)
            print(json.dumps({"kind": args.kind, "out": out}))
            return 0
        from .reranker import load_reranker

        docs = _documents(args)
        if not docs:
            parser.error("give at least one --doc or --image")
        r = load_reranker(args.model, device=args.device, dtype=args.dtype, max_length=args.max_length)
        if args.cmd == "score":
            logits = r.score(args.query, docs, truncate=args.truncate)
            print(json.dumps({"logits": logits}))
        else:
            res = r.rerank(args.query, docs, top_n=args.top_n, truncate=args.truncate)
            print(json.dumps({"results": [dict(index=i, logit=lg, probability=p) for i, lg, p in res]}))
        return 0
    except RerankError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
