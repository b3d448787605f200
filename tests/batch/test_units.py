"""Pure parts of deployments.batch (no Ray): row checks, the scorer called directly, input shapes, top-k."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deployments import batch as B

from .conftest import png_bytes


def _batch(**cols):
    out = {}
    for k, v in cols.items():
        a = np.empty(len(v), dtype=object)
        a[:] = v
        out[k] = a
    return out


def test_parse_rows_flags_bad_rows():
    b = _batch(query=["q", "q", None, 3, "q", "q"], document=["d", "", "d", "d", {"text": None, "image": b"x"}, 5])
    n, queries, docs, errors = B.parse_rows(b, "query", "document", None)
    assert n == 6
    assert errors[0] == "" and "empty document" in errors[1]
    assert "query must be a string" in errors[2] and "query must be a string" in errors[3]
    assert errors[4] == "" and docs[4] == (None, b"x")
    assert "must be a string" in errors[5]
    assert B.group_by_query(queries, errors) == {"q": [0, 4]}
    with pytest.raises(KeyError):
        B.parse_rows(b, "question", "document", None)


def test_scorer_direct_matches_score_and_isolates_bad_rows(tiny_text, text_reranker):
    s = B.RerankBatchScorer(tiny_text, device="cpu", truncate="NONE", max_length=64, max_batch_tokens=512)
    docs = ["protein for women", "", "summit " * 80, "a mountain top", {"text": "x", "image": b"img"}, "rivers"]
    b = _batch(query=["q one", "q one", "q one", "q two", "q two", "q two"], document=docs)
    out = s(b)
    assert out["logit"].dtype == np.float32 and out["probability"].dtype == np.float32
    err = out["error"].tolist()
    assert [bool(e) for e in err] == [False, True, True, False, True, False]
    assert err[2].startswith("too_long: Input length") and "(document" not in err[2]
    assert err[4].startswith("invalid_input: this text model accepts only text documents")
    np.testing.assert_allclose(out["logit"][[0]], text_reranker.score("q one", [docs[0]]), atol=1e-5)
    np.testing.assert_allclose(out["logit"][[3, 5]], text_reranker.score("q two", [docs[3], docs[5]]), atol=1e-5)
    assert all(math.isnan(out["logit"][i]) and math.isnan(out["probability"][i]) for i in (1, 2, 4))
    assert out["document"] is b["document"]  # input columns are passed through
    empty = s(_batch(query=[], document=[]))
    assert len(empty["logit"]) == 0 and len(empty["error"]) == 0


def test_lone_surrogates_are_row_errors_not_a_failed_batch(tiny_text, text_reranker):
    """JSONL may decode to strings with lone surrogates; the tokenizer raises a bare TypeError on them."""
    s = B.RerankBatchScorer(tiny_text, device="cpu", max_batch_tokens=512)
    b = _batch(query=["q one", "q one", "bad \ud800 query", "q two"],
               document=["fine", "bad \udfff doc", "whatever", "also fine"])
    out = s(b)
    err = out["error"].tolist()
    assert [bool(e) for e in err] == [False, True, True, False]
    assert err[1] == "invalid_input: document 0 is not valid Unicode text (it contains a lone surrogate)"
    assert err[2].startswith("invalid_input: query is not valid Unicode text")
    np.testing.assert_allclose(out["logit"][[0]], text_reranker.score("q one", ["fine"]), atol=1e-5)
    np.testing.assert_allclose(out["logit"][[3]], text_reranker.score("q two", ["also fine"]), atol=1e-5)


def test_scorer_packs_pairs_of_all_queries_together(tiny_text, monkeypatch):
    s = B.RerankBatchScorer(tiny_text, device="cpu")
    calls = []
    real = s.reranker.forward_rows
    def counting(rows, tiles, plan):
        calls.append(len(rows))
        return real(rows, tiles, plan)

    monkeypatch.setattr(s.reranker, "forward_rows", counting)
    s(_batch(query=[f"q{i % 5}" for i in range(40)], document=[f"document {i}" for i in range(40)]))
    assert calls == [40]  # one forward_rows over the 40 pairs of 5 queries


def test_cpu_passes_run_side_by_side_and_score_the_same(tiny_text, text_reranker, monkeypatch):
    """torch_threads=2 on CPU: the packed passes are dealt to two one-thread forward threads; the logits are
    those of one thread running every pass, and of the in-process reranker."""
    import threading

    docs = [f"document {i} " + "about mountains and rivers " * (i % 7) for i in range(48)]
    b = _batch(query=[f"q{i % 3}" for i in range(48)], document=docs)
    two = B.RerankBatchScorer(tiny_text, device="cpu", torch_threads=2, max_batch_tokens=256)
    one = B.RerankBatchScorer(tiny_text, device="cpu", torch_threads=1, max_batch_tokens=256)
    assert (two._parallel, two._pass_threads, one._parallel) == (2, 1, 1)
    seen: list[tuple[int, int]] = []
    real = two.reranker.forward_rows

    def recording(rows, *rest):
        import torch

        seen.append((threading.get_ident(), len(rows)))
        out = real(rows, *rest)
        seen.append((threading.get_ident(), -torch.get_num_threads()))
        return out

    monkeypatch.setattr(two.reranker, "forward_rows", recording)
    got = two(b)
    assert len({t for t, _ in seen}) == 2  # two forward threads
    assert sum(n for _, n in seen if n > 0) == 48 and {n for _, n in seen if n < 0} == {-1}  # 1 thread each
    np.testing.assert_allclose(got["logit"], one(b)["logit"], atol=1e-5)
    for q in ("q0", "q1", "q2"):
        idx = [i for i in range(48) if f"q{i % 3}" == q]
        np.testing.assert_allclose(got["logit"][idx], text_reranker.score(q, [docs[i] for i in idx]), atol=1e-5)
    seen.clear()
    two(_batch(query=["q"], document=["one short pair"]))  # a single pass gets every thread
    assert [n for _, n in seen] == [1, -2]


def test_missing_model_fails_loudly(tmp_path):
    from rerank_core.errors import WeightsNotFound

    with pytest.raises(WeightsNotFound):
        B.RerankBatchScorer(str(tmp_path / "nothing-here"))


def test_explode_candidates_and_pairs():
    recs = [
        (0, {"query": "q0", "documents": ["a", {"text": "b"}, {"image": "data:image/png;base64,AAAA"}],
             "doc_ids": [10, 11, 12]}),
        (1, {"query_id": "x", "query": "q1", "documents": ["c"]}),
        (2, {"query": "q2", "document": "d", "image": png_bytes(4, 4)}),
        (3, {"query_id": 5, "query": 7, "document": {"text": "e"}, "doc_id": "e1"}),
    ]
    rows = list(B.explode_records(recs, 100, "f.jsonl"))
    assert [(r["query_id"], r["doc_id"], r["position"]) for r in rows] == [
        ("100", "10", 0), ("100", "11", 1), ("100", "12", 2), ("x", "0", 0), ("q2", "102", 102), ("5", "e1", 103)
    ]
    assert rows[2]["document"] is None and rows[2]["image"].startswith("data:image/png")
    assert isinstance(rows[4]["image"], str)  # binary images travel as base64 text
    assert rows[5]["query"] is None  # a non-string query: reported by the scorer
    with pytest.raises(ValueError, match="doc_ids"):
        list(B.explode_records([(0, {"query": "q", "documents": ["a"], "doc_ids": [1, 2]})], 0, "f"))
    with pytest.raises(ValueError, match="needs 'document'"):
        list(B.explode_records([(0, {"query": "q"})], 0, "f"))


def test_input_files_and_counts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    table = pa.table({"query": ["a", "b", "c"], "document": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "d" / "part-1.parquet")
    (tmp_path / "d" / "part-0.jsonl").write_text('{"query": "a", "document": "b"}\n\n{"query": "c", "document": "d"}')
    (tmp_path / "d" / "_SUCCESS").write_text("")
    files = B.input_files(str(tmp_path / "d"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-0.jsonl", "part-1.parquet"]
    assert [B.count_records(f) for f in files] == [3, 3]
    assert [row for row, _ in B._records(files[0])] == [0, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(B._records(str(bad)))
    with pytest.raises(ValueError):
        B.input_files(str(tmp_path / "d" / "_SUCCESS"))


def test_top_k_pandas_ties_keep_order():
    import pandas as pd

    df = pd.DataFrame(
        {
            "query_id": ["a", "a", "a", "b", "b", "a", "b"],
            "position": [0, 1, 2, 0, 1, 3, 2],
            "logit": [1.0, 2.0, 2.0, 0.5, np.nan, 2.0, 0.5],
            "error": ["", "", "", "", "bad", "", ""],
        }
    )
    best = B.top_k_per_query(df, 2)
    want = [["a", 1, 1], ["a", 2, 2], ["b", 0, 1], ["b", 2, 2]]
    assert best[["query_id", "position", "rank"]].values.tolist() == want
    with pytest.raises(ValueError):
        B.top_k_per_query(df, 0)


def test_cli_arguments():
    p = B.build_parser()
    a = p.parse_args(["--input", "i", "--output", "o", "--model", "m", "--num-actors", "2,4", "--truncate", "none"])
    assert a.num_actors == (2, 4) and a.truncate == "NONE" and a.ray_address is None and a.top_k == 0
    assert p.parse_args(["--input", "i", "--output", "o", "--num-actors", "3"]).num_actors == 3
    with pytest.raises(SystemExit):
        p.parse_args(["--input", "i", "--output", "o", "--num-actors", "4,2"])
    json.dumps(vars(a))
