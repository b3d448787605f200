"""Unmodified real clients pointed at the service with only a base URL, auth on and off."""

from __future__ import annotations

import numpy as np
import pytest

from rerank_core import load_reranker, sigmoid

MODEL = "nvidia/llama-nemotron-rerank-1b-v2"
QUERY = "how much protein should a female eat?"
DOCS = [
    "As a general guideline, the CDC's average requirement of protein for women is 46 grams per day.",
    "Definition of summit: the highest point of a mountain.",
    "Calorie intake should not fall below 1,200 a day in women.",
    "Eggs, beans and fish are good sources of protein.",
]


@pytest.fixture(scope="module")
def logits(service):
    return np.array(load_reranker(service.sources["text"], device="cpu").score(QUERY, DOCS), dtype=np.float32)


@pytest.fixture(params=["auth-off", "auth-on"])
def key(request, service):
    if request.param == "auth-off":
        yield "placeholder-key"
        return
    service.set_keys(["sk-client-test"])
    try:
        yield "sk-client-test"
    finally:
        service.set_keys([])


def _order(logits) -> list[int]:
    return [int(i) for i in np.argsort(-logits, kind="stable")]


def test_langchain_cohere(service, logits, key):
    from langchain_cohere import CohereRerank

    r = CohereRerank(base_url=service.base_url, cohere_api_key=key, model=MODEL, top_n=3)
    res = r.rerank(DOCS, QUERY)
    assert [x["index"] for x in res] == _order(logits)[:3]
    for x in res:
        assert x["relevance_score"] == pytest.approx(float(sigmoid(logits[x["index"]])), abs=1e-5)


def test_langchain_nvidia(service, logits, key):
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    r = NVIDIARerank(base_url=service.base_url + "/v1", model=MODEL, api_key=key, top_n=4)
    out = r.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    assert [DOCS.index(o.page_content) for o in out] == _order(logits)
    for o in out:
        assert o.metadata["relevance_score"] == pytest.approx(float(logits[DOCS.index(o.page_content)]), abs=1e-4)


def test_llama_index_nvidia(service, logits, key):
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.nvidia_rerank import NVIDIARerank

    r = NVIDIARerank(base_url=service.base_url + "/v1", model=MODEL, api_key=key, top_n=4)
    out = r.postprocess_nodes([NodeWithScore(node=TextNode(text=d)) for d in DOCS], query_str=QUERY)
    assert [DOCS.index(o.node.text) for o in out] == _order(logits)
    for o in out:
        assert o.score == pytest.approx(float(logits[DOCS.index(o.node.text)]), abs=1e-4)


def test_infinity_client(service, logits, key):
    from infinity_client import AuthenticatedClient
    from infinity_client.api.default import rerank
    from infinity_client.models import RerankInput

    client = AuthenticatedClient(base_url=service.base_url, token=key)
    res = rerank.sync(client=client, body=RerankInput.from_dict({"query": QUERY, "documents": DOCS, "model": MODEL}))
    assert res is not None, "infinity-client could not parse the response"
    assert [x.index for x in res.results] == _order(logits)
    for x in res.results:
        assert x.relevance_score == pytest.approx(float(sigmoid(logits[x.index])), abs=1e-5)


@pytest.mark.parametrize("provider,uses_logits", [("cohere", False), ("hosted_vllm", False),
                                                  ("nvidia_nim/ranking", True)])
def test_litellm_providers(service, logits, key, provider, uses_logits):
    import litellm

    res = litellm.rerank(model=f"{provider}/{MODEL}", api_base=service.base_url, api_key=key, query=QUERY,
                         documents=DOCS, top_n=3)
    results = res.results
    assert [x["index"] for x in results] == _order(logits)[:3]
    for x in results:
        want = logits[x["index"]] if uses_logits else sigmoid(logits[x["index"]])
        assert x["relevance_score"] == pytest.approx(float(want), abs=1e-4)


def test_clients_fail_cleanly_with_a_wrong_key(service):
    import litellm
    from langchain_nvidia_ai_endpoints import NVIDIARerank
    from langchain_core.documents import Document

    service.set_keys(["sk-right"])
    try:
        with pytest.raises(Exception) as e:
            litellm.rerank(model=f"cohere/{MODEL}", api_base=service.base_url, api_key="sk-wrong", query=QUERY,
                           documents=DOCS)
        assert "401" in str(e.value) or "invalid API key" in str(e.value)
        with pytest.raises(Exception) as e:
            NVIDIARerank(base_url=service.base_url + "/v1", model=MODEL, api_key="sk-wrong").compress_documents(
                [Document(page_content=d) for d in DOCS], QUERY)
        assert "401" in str(e.value) or "API key" in str(e.value)
    finally:
        service.set_keys([])
