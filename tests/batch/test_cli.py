"""The job entry point end to end, in a subprocess with its own fresh local Ray (`--ray-address local`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

QUERIES = [
    {
        "query_id": "protein",
        "query": "how much protein should a woman eat",
        "documents": ["46 grams per day", "the summit of a mountain", "protein needs depend on age", "",
                      "calorie intake for adults"],
        "doc_ids": ["d1", "d2", "d3", "d4", "d5"],
    },
    {
        "query": "highest point of a mountain",
        "documents": [{"text": "a summit is the highest point"}, {"text": "rivers flow to the ocean"},
                      "mountain top", "bread and butter"],
    },
    {"query_id": 7, "query": "solar energy", "documents": ["solar panels convert light", "wind turbines",
                                                           "battery storage", "galaxy", "solar wind"]},
]


def _text(d):
    return d["text"] if isinstance(d, dict) else d


def test_cli_candidates_jsonl_with_top_k(tmp_path, tiny_text, text_reranker):
    import pandas as pd

    src = tmp_path / "candidates.jsonl"
    src.write_text("\n".join(json.dumps(q) for q in QUERIES) + "\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable, "-m", "deployments.batch", "--input", str(src), "--output", str(out), "--model", tiny_text,
        "--top-k", "3", "--ray-address", "local", "--num-actors", "1", "--batch-size", "8", "--device", "auto",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 14 and summary["errors"] == 1
    assert summary["pairs_per_s"] > 0 and summary["seconds"] > 0
    assert "pairs/s" in r.stderr  # the summary is logged too

    scores = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("*.parquet")))
    assert set(scores.columns) >= {"query_id", "query", "doc_id", "position", "document", "logit", "probability",
                                   "error"}
    assert "image" not in scores.columns
    assert len(scores) == 14
    ids = {"protein", "1", "7"}  # the query without an id is named by its input row number
    assert set(scores["query_id"]) == ids
    expected = {}
    for row, q in enumerate(QUERIES):
        qid = str(q.get("query_id", row))
        docs = [_text(d) for d in q["documents"]]
        good = [i for i, d in enumerate(docs) if d]
        logits = text_reranker.score(q["query"], [docs[i] for i in good])
        doc_ids = q.get("doc_ids") or [str(i) for i in range(len(docs))]
        expected[qid] = {doc_ids[i]: (i, lg) for i, lg in zip(good, logits)}
    for rec in scores.to_dict("records"):
        if rec["error"]:
            assert (rec["query_id"], rec["doc_id"]) == ("protein", "d4") and "empty document" in rec["error"]
            assert np.isnan(rec["logit"])
            continue
        pos, want = expected[rec["query_id"]][rec["doc_id"]]
        assert rec["position"] == pos
        assert rec["logit"] == pytest.approx(want, abs=1e-4)
        assert rec["probability"] == pytest.approx(1 / (1 + np.exp(-want)), abs=1e-5)

    top = pd.concat(pd.read_parquet(p) for p in sorted((out / "top_k").glob("*.parquet")))
    assert list(top.columns) == ["query_id", "rank", "doc_id", "position", "logit", "probability"]
    assert len(top) == 9
    for qid, g in top.groupby("query_id"):
        g = g.sort_values("rank")
        assert g["rank"].tolist() == [1, 2, 3]
        best = sorted(expected[qid].items(), key=lambda kv: (-kv[1][1], kv[1][0]))[:3]
        assert g["doc_id"].tolist() == [doc_id for doc_id, _ in best]
        np.testing.assert_allclose(g["logit"].to_numpy(), [lg for _, (_, lg) in best], atol=1e-4)
