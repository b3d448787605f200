"""Batch scoring through Ray Data on the session cluster (`ray_cluster`), against the tiny checkpoints.

Order matters: the tests that ask for a logical GPU fraction run before the `service` fixture is started
(its two scorers hold the cluster's whole logical GPU).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from deployments.batch import rerank_dataset, top_k_per_query

from .conftest import make_pairs, png_bytes

MAX_LENGTH = 128  # every good pair is shorter; the too-long row is not
LONG_DOC = "mountain summit " * 200


def _by_query(rows):
    groups = defaultdict(list)
    for r in rows:
        groups[r["query"]].append(r)
    return groups


@pytest.fixture(scope="module")
def text_rows():
    rows = make_pairs(100, 25)  # 2,500 short pairs
    n = len(rows)
    bad = [
        {"query_id": "q1", "query": rows[1]["query"], "document": "", "doc_id": "empty"},
        {"query_id": "q2", "query": rows[2]["query"], "document": None, "doc_id": "null"},
        {"query_id": "qx", "query": None, "document": "a document without a query", "doc_id": "no-query"},
        {"query_id": "q3", "query": rows[3]["query"], "document": LONG_DOC, "doc_id": "too-long"},
    ]
    for k, b in enumerate(bad):
        b["position"] = n + k
    return rows + bad


@pytest.fixture(scope="module")
def gpu_fraction(ray_cluster):
    """0.25 of the session's logical GPU, or 0 when the rerank service already holds all of it."""
    return 0.25 if ray_cluster.available_resources().get("GPU", 0) >= 0.25 else 0.0


@pytest.fixture(scope="module")
def scored_text(ray_cluster, tiny_text, text_rows, gpu_fraction):
    """All text pairs through map_batches on a GPU fraction (torch sees no CUDA: device="auto" picks CPU)."""
    import ray.data

    ds = ray.data.from_items(text_rows, override_num_blocks=8)
    out = rerank_dataset(
        ds,
        tiny_text,
        num_actors=(1, 2),
        num_gpus=gpu_fraction,
        batch_size=256,
        device="auto",
        truncate="NONE",
        max_length=MAX_LENGTH,
    )
    return out.materialize()


@pytest.fixture(scope="module")
def reference(scored_rows, text_reranker):
    """In-process logits of every good row (one thread: the Ray workers share the two cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = {}
        for query, rows in _by_query([r for r in scored_rows if not r["error"]]).items():
            for r, lg in zip(rows, text_reranker.score(query, [r["document"] for r in rows])):
                ref[r["position"]] = lg
        return ref
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scored_rows(scored_text):
    return sorted(scored_text.take_all(), key=lambda r: r["position"])


def test_schema_and_every_row_back(scored_text, scored_rows, text_rows):
    names = scored_text.schema().names
    for c in ("query_id", "query", "document", "doc_id", "position", "logit", "probability", "error"):
        assert c in names
    assert [r["position"] for r in scored_rows] == [r["position"] for r in text_rows]
    assert str(scored_text.schema().types[names.index("logit")]) == "float"
    assert str(scored_text.schema().types[names.index("probability")]) == "float"


def test_gpu_fraction_request_path(scored_rows, gpu_fraction):
    """The scores above came from actors that asked Ray for a quarter of a GPU (and ran on CPU)."""
    if not gpu_fraction:
        pytest.skip("the session's logical GPU is held by the rerank service (run tests/batch before tests/serve)")
    assert sum(1 for r in scored_rows if not r["error"]) == 2500


def test_scores_equal_in_process(scored_rows, reference):
    good = [r for r in scored_rows if not r["error"]]
    assert len(good) == 2500
    got = np.array([r["logit"] for r in good])
    want = np.array([reference[r["position"]] for r in good])
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose([r["probability"] for r in good], 1 / (1 + np.exp(-want)), atol=1e-5)


def test_bad_rows_reported_not_fatal(scored_rows):
    by_id = {r["doc_id"]: r for r in scored_rows}
    for doc_id, fragment in [
        ("empty", "empty document"),
        ("null", "empty document"),
        ("no-query", "query must be a string"),
        ("too-long", f"exceeds maximum allowed token size {MAX_LENGTH}"),
    ]:
        row = by_id[doc_id]
        assert fragment in row["error"], row["error"]
        assert math.isnan(row["logit"]) and math.isnan(row["probability"])
    assert sum(1 for r in scored_rows if r["error"]) == 4
    # the other rows of those queries were scored (the bad row was isolated)
    for q in ("q1", "q2", "q3"):
        assert all(not math.isnan(r["logit"]) for r in scored_rows if r["query_id"] == q and not r["error"])


def _python_top_k(rows, k):
    groups = defaultdict(list)
    for r in rows:
        if not r["error"]:
            groups[r["query_id"]].append(r)
    out = {}
    for qid, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["position"])
        rs = sorted(rs, key=lambda r: -r["logit"])  # stable: ties keep the original order
        out[qid] = [r["position"] for r in rs[:k]]
    return out


def test_top_k_dataset_and_pandas(scored_text, scored_rows):
    import pandas as pd

    # logits rounded to one decimal: plenty of ties, which must keep the input order
    def coarse(batch):
        batch["logit"] = np.round(batch["logit"], 1).astype(np.float32)
        return batch

    ds = scored_text.map_batches(coarse, batch_format="numpy").materialize()
    rows = ds.take_all()
    want = _python_top_k(rows, 3)
    assert sum(len(v) for v in want.values()) == 300
    got_rows = top_k_per_query(ds, 3, num_partitions=4).take_all()
    got = defaultdict(list)
    for r in sorted(got_rows, key=lambda r: (r["query_id"], r["rank"])):
        got[r["query_id"]].append(r["position"])
    assert dict(got) == want
    assert all(1 <= r["rank"] <= 3 for r in got_rows)
    df = pd.DataFrame(rows)
    best = top_k_per_query(df, 3)
    got_df = {q: g.sort_values("rank")["position"].tolist() for q, g in best.groupby("query_id")}
    assert got_df == want
    # without a position column, a DataFrame's row order breaks ties
    shuffled = df.sample(frac=1.0, random_state=0).drop(columns="position")
    best2 = top_k_per_query(shuffled, 2)
    for qid, g in best2.groupby("query_id"):
        rs = shuffled[(shuffled.query_id == qid) & (shuffled.error == "")]
        order = rs.sort_values("logit", ascending=False, kind="stable")["doc_id"].tolist()[:2]
        assert g.sort_values("rank")["doc_id"].tolist() == order


def test_vl_bad_images_reported(ray_cluster, tiny_vl, vl_local):
    import ray.data

    good_png, page_jpeg = png_bytes(96, 64, 1), png_bytes(300, 420, 2, "JPEG")
    rows = [
        {"query": "which chart shows revenue?", "document": "revenue grew", "image": good_png},
        {"query": "which chart shows revenue?", "document": "", "image": page_jpeg},
        {"query": "which chart shows revenue?", "document": "text only", "image": None},
        {"query": "which chart shows revenue?", "document": "broken", "image": b"not an image at all"},
        {"query": "which chart shows revenue?", "document": "", "image": None},
        {"query": "a second query", "document": "cut png", "image": good_png[: len(good_png) // 2]},
        {"query": "a second query", "document": "a page", "image": good_png},
    ]
    for i, r in enumerate(rows):
        r["position"] = i
    ds = ray.data.from_items(rows)
    out = rerank_dataset(ds, tiny_vl, num_actors=1, batch_size=16, image_column="image").take_all()
    out = sorted(out, key=lambda r: r["position"])
    errors = [r["error"] for r in out]
    assert [bool(e) for e in errors] == [False, False, False, True, True, True, False], errors
    assert "image" in errors[3] and "empty document" in errors[4] and "image" in errors[5]
    for i in (0, 1, 2, 6):
        r = rows[i]
        doc = r["document"] if r["image"] is None else {"text": r["document"], "image": r["image"]}
        want = vl_local.score(r["query"], [doc])[0]
        assert out[i]["logit"] == pytest.approx(want, abs=1e-4)
        assert out[i]["image"] == r["image"]  # input columns come back unchanged


def test_model_failure_fails_the_job(ray_cluster, tmp_path):
    import ray.data

    ds = ray.data.from_items([{"query": "q", "document": "d"}])
    with pytest.raises(Exception, match="WeightsNotFound|not a directory"):
        rerank_dataset(ds, str(tmp_path / "missing-checkpoint"), num_actors=1, batch_size=8).take_all()


# ------------------------------------------------------------------------ against the running service
def test_scores_equal_online_api(service, scored_rows):
    good = [r for r in scored_rows if not r["error"]]
    for query, rows in _by_query(good).items():
        r = service.client.post(
            "/v1/score",
            json={"text_1": query, "text_2": [x["document"] for x in rows], "use_activation": False},
        )
        assert r.status_code == 200, r.text
        got = [d["score"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
        np.testing.assert_allclose([x["logit"] for x in rows], got, atol=1e-4)


def test_serve_handle_path_equals_in_process(service, text_rows, reference):
    import ray.data

    rows = text_rows[:300] + text_rows[-4:]  # 300 good pairs and the 4 bad ones
    ds = ray.data.from_items(rows)
    out = rerank_dataset(
        ds,
        serve_app="rerank",
        serve_model="text",
        num_actors=1,
        batch_size=128,
        truncate="NONE",
        max_length=MAX_LENGTH,
        docs_per_request=8,
    ).take_all()
    out = sorted(out, key=lambda r: r["position"])
    assert len(out) == len(rows)
    by_id = {r["doc_id"]: r for r in out}
    assert "exceeds maximum allowed token size" in by_id["too-long"]["error"]  # isolated by the retry one by one
    assert "empty document" in by_id["empty"]["error"] and "query must be a string" in by_id["no-query"]["error"]
    good = [r for r in out if not r["error"]]
    assert len(good) == 300
    got = np.array([r["logit"] for r in good])
    np.testing.assert_allclose(got, [reference[r["position"]] for r in good], atol=1e-4)
    np.testing.assert_allclose([r["probability"] for r in good], 1 / (1 + np.exp(-got)), atol=1e-5)


def test_serve_handle_path_vl_images(service, vl_local):
    import ray.data

    good = png_bytes(80, 80, 5)
    rows = [
        {"query": "find the chart", "document": "a chart", "image": good, "position": 0},
        {"query": "find the chart", "document": "", "image": b"broken bytes", "position": 1},
        {"query": "find the chart", "document": "plain text", "image": None, "position": 2},
    ]
    out = rerank_dataset(
        ray.data.from_items(rows), serve_app="rerank", serve_model="vl", num_actors=1, batch_size=8,
        image_column="image",
    ).take_all()
    out = sorted(out, key=lambda r: r["position"])
    assert out[1]["error"] and "image" in out[1]["error"] and math.isnan(out[1]["logit"])
    assert out[0]["error"] == "" and out[2]["error"] == ""
    assert out[0]["logit"] == pytest.approx(vl_local.score("find the chart", [{"text": "a chart", "image": good}])[0],
                                            abs=1e-4)
    assert out[2]["logit"] == pytest.approx(vl_local.score("find the chart", ["plain text"])[0], abs=1e-4)
