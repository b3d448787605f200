"""Rerank the top N of a TREC retrieval run with the Ray Data batch path; print nDCG@10 before and after.

    python examples/evaluate_trec.py --model /path/to/llama-nemotron-rerank-1b-v2 \\
        --run examples/data/run.bm25.trec --qrels examples/data/qrels.txt \\
        --queries examples/data/queries.tsv --corpus examples/data/corpus.tsv \\
        --top-n 100 --output reranked.trec

Inputs (whitespace-separated TREC formats, tab-separated text files):

* run: ``qid Q0 docid rank score tag`` (ranks are ignored: like trec_eval, the order is score descending,
  equal scores by docid descending);
* qrels: ``qid iter docid rel``;
* queries: ``qid<TAB>text``; corpus: ``docid<TAB>text`` (or ``docid<TAB>title<TAB>text``), or JSONL with
  ``_id``/``docid``/``id``, ``text`` and an optional ``title``.

nDCG@10 is trec_eval's ``ndcg_cut.10``: linear gain (the judged ``rel``; negative judgments count as 0),
discount ``log2(rank + 1)``, the ideal ranking from every judged document of the query, averaged over the
queries that are in both the run and the qrels (trec_eval without ``-c``).

The reranked run holds the top N of each query in the reranker's order (score = the reranker's logit;
equal logits keep the retrieval order); documents that could not be scored (missing from the corpus,
empty) follow them, in retrieval order, below the lowest logit. Documents below the top N are dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Run = dict[str, list[tuple[str, float]]]  # qid -> [(docid, score)] in ranking order


# ----------------------------------------------------------------------------------------------- files
def read_run(path: str) -> Run:
    run: dict[str, dict[str, float]] = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 6:
                raise ValueError(f"{path}:{n}: expected 'qid Q0 docid rank score tag'")
            qid, docid, score = parts[0], parts[2], float(parts[4])
            run[qid][docid] = score  # a repeated docid keeps its last score, as trec_eval does
    return {qid: ranked(docs.items()) for qid, docs in run.items()}


def ranked(pairs) -> list[tuple[str, float]]:
    """trec_eval's order: score descending, then docid descending."""
    return sorted(pairs, key=lambda p: (p[1], p[0]), reverse=True)


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise ValueError(f"{path}:{n}: expected 'qid iter docid rel'")
            qrels[parts[0]][parts[2]] = int(parts[3])
    return dict(qrels)


def read_texts(path: str) -> dict[str, str]:
    """``id<TAB>text``, ``id<TAB>title<TAB>text`` or JSONL (``_id``/``docid``/``id``, ``title``, ``text``)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    key = str(rec.get("_id", rec.get("docid", rec.get("id"))))
                    title, text = rec.get("title") or "", rec.get("text") or ""
                    out[key] = f"{title}\n{text}" if title else text
            return out
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) == 2:
                out[parts[0]] = parts[1]
            elif len(parts) >= 3:
                title, text = parts[1], "\t".join(parts[2:])
                out[parts[0]] = f"{title}\n{text}" if title else text
    return out


def write_run(run: Run, path: str, tag: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for qid in sorted(run):
            for rank, (docid, score) in enumerate(run[qid], 1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n")


# ----------------------------------------------------------------------------------------------- metric
def ndcg_at_k(run: Run, qrels: dict[str, dict[str, int]], k: int = 10) -> tuple[float, dict[str, float]]:
    """trec_eval ``ndcg_cut.k`` (linear gain): the mean over queries in both run and qrels, and per query."""
    per_query: dict[str, float] = {}
    for qid, docs in run.items():
        judged = qrels.get(qid)
        if judged is None:
            continue
        order = ranked(docs)[:k]
        dcg = sum(max(judged.get(d, 0), 0) / math.log2(i + 2) for i, (d, _) in enumerate(order))
        ideal = sorted((max(r, 0) for r in judged.values()), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        per_query[qid] = dcg / idcg if idcg > 0 else 0.0
    mean = sum(per_query.values()) / len(per_query) if per_query else 0.0
    return mean, per_query


# ----------------------------------------------------------------------------------------------- rerank
def candidate_rows(run: Run, queries: dict[str, str], corpus: dict[str, str], top_n: int) -> list[dict]:
    """One pair row per (query, top-N document); ``position`` is the retrieval rank (0-based)."""
    rows = []
    for qid, docs in run.items():
        if qid not in queries:
            continue
        for pos, (docid, _) in enumerate(docs[:top_n]):
            rows.append(
                {"query_id": qid, "query": queries[qid], "doc_id": docid, "position": pos,
                 "document": corpus.get(docid, "")}
            )
    return rows


def rerank_run(
    run: Run,
    queries: dict[str, str],
    corpus: dict[str, str],
    model: str | None,
    top_n: int = 100,
    num_actors: int | tuple[int, int] = (1, 2),
    num_gpus: float = 0.0,
    batch_size: int = 256,
    serve_app: str | None = None,
    serve_model: str = "text",
    **scorer_kwargs,
) -> tuple[Run, dict]:
    """The reranked run (top N per query) and counts, scored by Ray Data on the current Ray cluster."""
    import ray.data

    from deployments.batch import rerank_dataset

    rows = candidate_rows(run, queries, corpus, top_n)
    if not rows:
        raise ValueError("no query of the run has a text in the queries file")
    ds = ray.data.from_items(rows)
    if serve_app:
        scored = rerank_dataset(ds, serve_app=serve_app, serve_model=serve_model, num_actors=num_actors,
                                batch_size=batch_size, **scorer_kwargs)
    else:
        scored = rerank_dataset(ds, model, num_actors=num_actors, num_gpus=num_gpus, batch_size=batch_size,
                                **scorer_kwargs)
    results = scored.select_columns(["query_id", "doc_id", "position", "logit", "error"]).take_all()
    by_query: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_query[r["query_id"]].append(r)
    out: Run = {}
    errors = 0
    for qid, rs in by_query.items():
        good = sorted((r for r in rs if not r["error"]), key=lambda r: (-r["logit"], r["position"]))
        bad = sorted((r for r in rs if r["error"]), key=lambda r: r["position"])
        errors += len(bad)
        floor = min((r["logit"] for r in good), default=0.0) - 1.0
        out[qid] = [(r["doc_id"], float(r["logit"])) for r in good]
        out[qid] += [(r["doc_id"], floor - 0.001 * i) for i, r in enumerate(bad)]
    return out, {"pairs": len(results), "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="TREC run file: qid Q0 docid rank score tag")
    ap.add_argument("--qrels", required=True, help="TREC qrels: qid iter docid rel")
    ap.add_argument("--queries", required=True, help="qid<TAB>text")
    ap.add_argument("--corpus", required=True, help="docid<TAB>text (or docid<TAB>title<TAB>text, or JSONL)")
    ap.add_argument("--model", help="reranker checkpoint directory or hub id")
    ap.add_argument("--top-n", type=int, default=100, help="documents reranked per query (default 100)")
    ap.add_argument("--output", default="reranked.trec", help="where to write the reranked run")
    ap.add_argument("--tag", default="nemotron-rerank", help="run tag of the written run")
    ap.add_argument("--num-actors", type=int, default=1)
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (fractions allowed)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--serve-app", default=None, help="score through this running Serve app instead")
    ap.add_argument("--serve-model", default="text")
    ap.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS if set, else a new local Ray")
    args = ap.parse_args(argv)
    if not args.model and not args.serve_app:
        ap.error("--model (or --serve-app) is required")

    import ray

    run = read_run(args.run)
    qrels = read_qrels(args.qrels)
    queries = read_texts(args.queries)
    corpus = read_texts(args.corpus)
    if not ray.is_initialized():
        ray.init(address=args.ray_address)
    t0 = time.monotonic()
    kwargs = {} if args.serve_app else {"device": args.device}
    reranked, counts = rerank_run(
        run, queries, corpus, args.model, top_n=args.top_n, num_actors=args.num_actors, num_gpus=args.num_gpus,
        batch_size=args.batch_size, serve_app=args.serve_app, serve_model=args.serve_model, **kwargs,
    )
    seconds = time.monotonic() - t0
    write_run(reranked, args.output, args.tag)
    before, per_before = ndcg_at_k(run, qrels)
    after, per_after = ndcg_at_k(reranked, qrels)
    print(f"{'query':<12}{'nDCG@10 before':>16}{'after':>10}")
    for qid in sorted(per_before):
        print(f"{qid:<12}{per_before[qid]:>16.4f}{per_after.get(qid, 0.0):>10.4f}")
    print(f"{'mean':<12}{before:>16.4f}{after:>10.4f}   ({len(per_before)} queries, linear gain as trec_eval)")
    summary = {"ndcg@10_before": round(before, 4), "ndcg@10_after": round(after, 4), "queries": len(per_before),
               **counts, "seconds": round(seconds, 2), "reranked_run": args.output}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
