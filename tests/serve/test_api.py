"""The HTTP contract, end to end through a real Serve deployment of serve_config.yaml."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import numpy as np
import pytest

from deployments.protocol import ErrorResponse, ModelList, RankingResponse, RerankResponse, ScoreResponse
from rerank_core import load_reranker, sigmoid

MODEL = "nvidia/llama-nemotron-rerank-1b-v2"
QUERY = "how much protein should a female eat?"
DOCS = [
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day.",
    "Definition of summit for English Language Learners: the highest point of a mountain.",
    "Calorie intake should not fall below 1,200 a day in women or 1,500 a day in men.",
    "Eiweiß: Frauen brauchen etwa 46 Gramm pro Tag. 女性每天应摄入约46克蛋白质。",
    "protein",
]


@pytest.fixture(scope="module")
def local(service):
    return load_reranker(service.sources["text"], device="cpu")


@pytest.fixture(scope="module")
def expected(local):
    return np.array(local.score(QUERY, DOCS), dtype=np.float32)


def _error(r, status: int) -> ErrorResponse:
    assert r.status_code == status, r.text
    body = ErrorResponse.model_validate(r.json())
    assert body.code == status and body.error.code == status and body.message == body.error.message
    assert "Traceback" not in r.text
    return body


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_rerank_routes_match_in_process(service, expected, route):
    r = service.client.post(route, json={"model": MODEL, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = RerankResponse.model_validate(r.json())
    assert body.model == MODEL and body.id.startswith("rerank-")
    assert [x.index for x in body.results] == list(np.argsort(-expected, kind="stable"))
    for x in body.results:
        assert x.relevance_score == pytest.approx(float(sigmoid(expected[x.index])), abs=1e-5)
        assert x.document is None
    assert body.usage.prompt_tokens == body.usage.total_tokens == body.meta.tokens.input_tokens > 0
    assert body.meta.warnings == []


def test_rerank_options(service, expected):
    docs = [DOCS[0], {"text": DOCS[1], "title": "summit", "id": 7}, {"text": DOCS[2]}]
    r = service.client.post(
        "/v1/rerank",
        json={"query": QUERY, "documents": docs, "top_n": 2, "return_documents": True, "raw_scores": True,
              "max_tokens_per_doc": None, "unknown_field": {"x": 1}},
    )
    body = RerankResponse.model_validate(r.json())
    assert len(body.results) == 2
    exp = expected[:3]
    order = list(np.argsort(-exp, kind="stable"))[:2]
    assert [x.index for x in body.results] == order
    for x in body.results:
        assert x.relevance_score == pytest.approx(float(exp[x.index]), abs=1e-4)
        want = {"text": docs[x.index]} if isinstance(docs[x.index], str) else docs[x.index]
        assert x.document == want


def test_nulls_and_zero_top_n_mean_all(service):
    r = service.client.post(
        "/v2/rerank",
        json={"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": None, "return_documents": None,
              "max_tokens_per_doc": None, "truncate": None, "raw_scores": None},
    )
    assert len(RerankResponse.model_validate(r.json()).results) == len(DOCS)
    r = service.client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 0})
    assert len(RerankResponse.model_validate(r.json()).results) == len(DOCS)


def test_vllm_content_documents(service, expected):
    docs = [{"content": [{"type": "text", "text": d}]} for d in DOCS]
    r = service.client.post("/rerank", json={"query": QUERY, "documents": docs})
    body = RerankResponse.model_validate(r.json())
    got = {x.index: x.relevance_score for x in body.results}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], sigmoid(expected), atol=1e-5)


def test_nim_ranking(service, expected):
    r = service.client.post(
        "/v1/ranking",
        json={"model": MODEL, "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS], "truncate": "END"},
    )
    body = RankingResponse.model_validate(r.json())
    assert [x.index for x in body.rankings] == list(np.argsort(-expected, kind="stable"))
    for x in body.rankings:
        assert x.logit == pytest.approx(float(expected[x.index]), abs=1e-4)
    r = service.client.post("/v1/ranking", json={"query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS],
                                                 "top_k": 2})
    assert len(RankingResponse.model_validate(r.json()).rankings) == 2


@pytest.mark.parametrize("route", ["/v1/score", "/score"])
def test_vllm_score(service, expected, route):
    r = service.client.post(route, json={"model": MODEL, "text_1": QUERY, "text_2": DOCS})
    body = ScoreResponse.model_validate(r.json())
    assert [d.index for d in body.data] == list(range(len(DOCS)))
    np.testing.assert_allclose([d.score for d in body.data], sigmoid(expected), atol=1e-5)
    r = service.client.post(route, json={"queries": QUERY, "documents": DOCS, "use_activation": False})
    np.testing.assert_allclose([d.score for d in ScoreResponse.model_validate(r.json()).data], expected, atol=1e-4)


def test_vllm_score_pairwise(service, local):
    queries = ["protein for women", "mountain top"]
    docs = [DOCS[0], DOCS[1]]
    r = service.client.post("/v1/score", json={"text_1": queries, "text_2": docs, "use_activation": False})
    got = [d.score for d in ScoreResponse.model_validate(r.json()).data]
    want = [local.score(q, [d])[0] for q, d in zip(queries, docs)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    _error(service.client.post("/v1/score", json={"text_1": ["a", "b", "c"], "text_2": ["x", "y"]}), 400)


def test_batched_scores_independent_of_request_mix(service, expected):
    """A document's score does not depend on what else is in its request (NVIDIA clients split batches)."""
    many = DOCS * 8  # 40 documents -> several chunks, sharing batches
    r = service.client.post("/v1/ranking", json={"query": {"text": QUERY}, "passages": [{"text": d} for d in many]})
    got = {x.index: x.logit for x in RankingResponse.model_validate(r.json()).rankings}
    np.testing.assert_allclose([got[i] for i in range(len(many))], np.tile(expected, 8), atol=1e-4)


def test_truncation_is_reported(service, local):
    long_doc = "protein " * 400
    r = service.client.post("/v1/rerank", json={"query": QUERY, "documents": ["short", long_doc],
                                                "max_tokens_per_doc": 50, "raw_scores": True})
    body = RerankResponse.model_validate(r.json())
    assert any("document 1 truncated" in w for w in body.meta.warnings), body.meta.warnings
    got = {x.index: x.relevance_score for x in body.results}
    want = local.score(QUERY, ["short", long_doc], max_tokens_per_doc=50)
    np.testing.assert_allclose([got[0], got[1]], want, atol=1e-4)


def test_truncation_at_model_limit_and_none(service):
    huge = "word " * 9000  # over 8192 tokens
    r = service.client.post("/v1/rerank", json={"query": "q", "documents": [huge]})
    body = RerankResponse.model_validate(r.json())
    assert body.usage.prompt_tokens == 8192
    assert body.meta.warnings == ["document 0 truncated to 8192 tokens"]
    err = _error(service.client.post("/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": huge}],
                                                          "truncate": "NONE"}), 400)
    assert "exceeds maximum allowed token size 8192" in err.message and err.message.startswith("Input length 900")


def test_chunk_strategy(service, local):
    doc = " ".join(f"fact {i} about protein" for i in range(200))
    r = service.client.post("/v1/rerank", json={"query": QUERY, "documents": [doc, "short"], "truncate": "CHUNK",
                                                "raw_scores": True})
    assert r.status_code == 200, r.text
    got = {x.index: x.relevance_score for x in RerankResponse.model_validate(r.json()).results}
    # the service's limit is 8192 tokens: nothing to chunk; the score equals plain scoring
    assert got[0] == pytest.approx(local.score(QUERY, [doc])[0], abs=1e-4)
    r = service.client.post("/v1/score", json={"text_1": QUERY, "text_2": [doc], "truncate_prompt_tokens": 64,
                                               "use_activation": False})
    assert r.status_code == 200
    short = local.score(QUERY, [doc], max_length=64)[0]
    assert ScoreResponse.model_validate(r.json()).data[0].score == pytest.approx(short, abs=1e-4)


def test_models_and_health(service):
    r = service.client.get("/v1/models")
    ids = [m.id for m in ModelList.model_validate(r.json()).data]
    assert ids[0] == MODEL and "llama-nemotron-rerank-1b-v2" in ids
    r = service.client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json()["id"] == MODEL
    _error(service.client.get("/v1/models/not-a-model"), 404)
    for path in ("/health", "/v1/health/live", "/v1/health/ready"):
        assert service.client.get(path).status_code == 200
    assert service.client.get("/docs").status_code == 200
    spec = service.client.get("/openapi.json").json()
    for path in ("/v1/rerank", "/v2/rerank", "/rerank", "/v1/ranking", "/v1/score", "/score", "/v1/models"):
        assert path in spec["paths"]


def test_request_id_echoed(service):
    r = service.client.post("/v1/rerank", json={"query": "q", "documents": ["d"]}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = service.client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert len(r.headers["x-request-id"]) >= 8


@pytest.mark.parametrize(
    "route,body,param",
    [
        ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
        ("/v1/rerank", {"query": "q"}, "documents"),
        ("/v1/rerank", {"documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": "q", "documents": "not a list"}, "documents"),
        ("/v1/rerank", {"query": "q", "documents": [1, 2]}, "documents"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "truncate": "MIDDLE"}, "truncate"),
        ("/v1/rerank", {"query": "q", "documents": ["a"] * 1001}, "documents"),
        ("/v1/rerank", {"query": "q", "documents": [{"title": "no text"}]}, "documents"),
        ("/v1/rerank", {"query": {"image": "data:image/png;base64,AAAA"}, "documents": ["a"]}, "query"),
        ("/v1/ranking", {"query": {"text": "q"}, "passages": []}, "documents"),
        ("/v1/score", {"text_1": "q"}, "text_2"),
    ],
)
def test_bad_requests_are_400(service, route, body, param):
    err = _error(service.client.post(route, json=body), 400)
    assert err.type == "invalid_request_error"
    assert err.error.param == param or param in err.message


def test_malformed_json_is_400(service):
    r = service.client.post("/v1/rerank", content=b'{"query": "q", "documents": [', headers={"content-type":
                                                                                          "application/json"})
    _error(r, 400)


def test_image_to_text_model_names_the_vl_model(service):
    png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    err = _error(service.client.post("/v1/rerank", json={"model": MODEL, "query": "q", "documents": [{"image": png}]}),
                 400)
    assert "nvidia/llama-nemotron-rerank-vl-1b-v2" in err.message


def test_unknown_model_and_route_are_404(service):
    err = _error(service.client.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": ["a"]}), 404)
    assert MODEL in err.message
    _error(service.client.post("/v1/nothing", json={}), 404)


def test_declared_oversized_body_is_413_before_reading(service):
    """A Content-Length over the limit is refused without the body ever being sent."""
    u = urlparse(service.base_url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 999999999999\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 413")


def test_auth_on_and_off(service):
    body = {"query": QUERY, "documents": DOCS}
    # off: any header (placeholders included) or none is accepted
    for headers in ({}, {"Authorization": "Bearer NO_API_KEY_PROVIDED"}, {"Authorization": "Bearer **********"}):
        assert service.client.post("/v1/rerank", json=body, headers=headers).status_code == 200
    service.set_keys(["sk-test-1", "sk-test-2"])
    try:
        for route, payload in [("/v1/rerank", body), ("/v2/rerank", body), ("/rerank", body),
                               ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "a"}]}),
                               ("/v1/score", {"text_1": "q", "text_2": ["a"]}),
                               ("/score", {"text_1": "q", "text_2": ["a"]})]:
            r = service.client.post(route, json=payload)
            err = _error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer" and err.type == "authentication_error"
            _error(service.client.post(route, json=payload, headers={"Authorization": "Bearer wrong"}), 401)
            ok = service.client.post(route, json=payload, headers={"Authorization": "Bearer sk-test-2"})
            assert ok.status_code == 200, ok.text
        # health and model listing stay open
        assert service.client.get("/v1/models").status_code == 200
        assert service.client.get("/v1/health/ready").status_code == 200
    finally:
        service.set_keys([])


def test_cohere_sdk_clients(service, expected):
    import cohere

    order = list(np.argsort(-expected, kind="stable"))
    v2 = cohere.ClientV2(api_key="anything", base_url=service.base_url)
    res = v2.rerank(model=MODEL, query=QUERY, documents=DOCS, top_n=3)
    assert [r.index for r in res.results] == order[:3]
    for r in res.results:
        assert r.relevance_score == pytest.approx(float(sigmoid(expected[r.index])), abs=1e-5)
    v1 = cohere.Client(api_key="anything", base_url=service.base_url)
    res = v1.rerank(model=MODEL, query=QUERY, documents=DOCS, return_documents=True)
    assert [r.index for r in res.results] == order
    assert res.results[0].document.text == DOCS[order[0]]


def test_cohere_sdk_with_auth(service, expected):
    import cohere

    service.set_keys(["sk-cohere"])
    try:
        ok = cohere.ClientV2(api_key="sk-cohere", base_url=service.base_url)
        assert len(ok.rerank(model=MODEL, query=QUERY, documents=DOCS).results) == len(DOCS)
        bad = cohere.ClientV2(api_key="wrong", base_url=service.base_url)
        with pytest.raises(Exception) as e:
            bad.rerank(model=MODEL, query=QUERY, documents=DOCS)
        assert "401" in str(e.value) or getattr(e.value, "status_code", None) == 401
    finally:
        service.set_keys([])


def test_access_log_line_has_no_text(service):
    """The structured request log carries ids and counts, never document text or keys."""
    secret_doc = "SECRET-DOCUMENT-TEXT-" + "x" * 8
    r = service.client.post("/v1/rerank", json={"query": "q", "documents": [secret_doc]},
                            headers={"x-request-id": "log-check-1", "Authorization": "Bearer KEY-IN-HEADER"})
    assert r.status_code == 200
    import glob
    import os
    import time

    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    deadline = time.monotonic() + 20
    line = None
    while time.monotonic() < deadline and line is None:
        for path in glob.glob(os.path.join(session, "logs", "serve", "*Ingress*.log")):
            for text in open(path, errors="replace"):
                if "log-check-1" in text and "rerank_request" in text:
                    line = text
        time.sleep(0.5)
    assert line is not None
    payload = json.loads(line[line.index("{"):])
    assert payload["request_id"] == "log-check-1" and payload["status"] == 200 and payload["documents"] == 1
    assert payload["model"] == MODEL and payload["tokens"] > 0 and payload["latency_ms"] > 0
    for path in glob.glob(os.path.join(session, "logs", "serve", "*.log")):
        content = open(path, errors="replace").read()
        assert secret_doc not in content and "KEY-IN-HEADER" not in content
