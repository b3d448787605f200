"""examples/evaluate_trec.py: the nDCG@10 it prints, and a rerank of the bundled sample on the session cluster."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("evaluate_trec", EXAMPLES / "evaluate_trec.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ndcg_at_10_is_trec_eval_linear_gain(ev):
    run = {"q": [("a", 3.0), ("b", 2.0), ("c", 1.0)], "unjudged": [("a", 1.0)]}
    qrels = {"q": {"b": 2, "c": 1, "d": 3, "a": 0, "e": -1}, "none": {"x": 1}}
    mean, per = ev.ndcg_at_k(run, qrels)
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert per == {"q": pytest.approx(dcg / idcg)} and mean == pytest.approx(dcg / idcg)
    # ties: score descending, then docid descending (trec_eval), whatever the order in the file
    tied = {"q": [("b", 1.0), ("d", 1.0)]}
    assert ev.ndcg_at_k(tied, {"q": {"d": 1}})[1]["q"] == pytest.approx(1.0)


def test_sample_files_parse(ev):
    data = EXAMPLES / "data"
    run = ev.read_run(str(data / "run.bm25.trec"))
    qrels = ev.read_qrels(str(data / "qrels.txt"))
    queries = ev.read_texts(str(data / "queries.tsv"))
    corpus = ev.read_texts(str(data / "corpus.tsv"))
    assert set(run) == set(qrels) == set(queries) == {"q1", "q2", "q3", "q4"}
    assert all(d in corpus for docs in run.values() for d, _ in docs)
    before, _ = ev.ndcg_at_k(run, qrels)
    assert 0.3 < before < 0.8


def test_rerank_sample_run(ev, ray_cluster, tiny_text, text_reranker, tmp_path):
    data = EXAMPLES / "data"
    run = ev.read_run(str(data / "run.bm25.trec"))
    queries = ev.read_texts(str(data / "queries.tsv"))
    corpus = ev.read_texts(str(data / "corpus.tsv"))
    del corpus["d306"]  # a document missing from the corpus: reported, ranked last
    reranked, counts = ev.rerank_run(run, queries, corpus, tiny_text, top_n=5, num_actors=1, batch_size=8)
    assert counts == {"pairs": 20, "errors": 1}
    for qid, docs in run.items():
        top = [d for d, _ in docs[:5]]
        got = reranked[qid]
        assert sorted(d for d, _ in got) == sorted(top)
        good = [d for d in top if d in corpus]
        logits = text_reranker.score(queries[qid], [corpus[d] for d in good])
        want = sorted(zip(good, logits), key=lambda p: -p[1])
        assert [d for d, _ in got[: len(want)]] == [d for d, _ in want]
        assert [s for _, s in got[: len(want)]] == pytest.approx([s for _, s in want], abs=1e-4)
    assert reranked["q3"][-1][0] == "d306"
    out = tmp_path / "reranked.trec"
    ev.write_run(reranked, str(out), "test")
    back = ev.read_run(str(out))
    order = {q: [d for d, _ in docs] for q, docs in reranked.items()}
    assert {q: [d for d, _ in docs] for q, docs in back.items()} == order
