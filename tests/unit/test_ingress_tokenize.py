"""Text-only chunks tokenized in the ingress (``ModelArgs.tokenize_in_ingress``): the same token ids a preprocess
replica would send, one handle call fewer; chunks with images still go to preprocess; bad input is the same
clear error. The ingress's chunk call runs against stand-in handles and a real tokenizer (no Ray)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.app import bundled_scorer_calls, tokenized_in_ingress
from deployments.config import AppArgs, LimitsArgs, ModelArgs
from deployments.messages import PrepareRequest, ScoredChunk
from deployments.prepare import ChunkPreparer
from rerank_core import load_reranker
from rerank_core.errors import InvalidInput
from tests.reliability.fakes import FakeDeployment, FakeMethod, FakeResponse, ingress_without_replica

CHUNK = ScoredChunk(logits=np.zeros(2, np.float32), tokens=5)
PNG_1PX = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


class Recording:
    """``handle.method`` that keeps what each ``.remote()`` was given."""

    def __init__(self, answer):
        self.answer = answer
        self.args: list[tuple] = []

    def remote(self, *args):
        self.args.append(args)
        return FakeResponse(self.answer)


class Records:
    def __init__(self):
        self.calls: list[tuple[float, int]] = []

    def record(self, ms: float, images: int) -> None:
        self.calls.append((ms, images))


@pytest.fixture(scope="module")
def preparer(tiny_text) -> ChunkPreparer:
    return ChunkPreparer(ModelArgs(id="m", source=tiny_text, query_max_tokens=16), LimitsArgs())


def _handles(preparer: ChunkPreparer, score: Recording, pre: FakeMethod) -> dict:
    return {
        "preprocess": FakeDeployment(prepare=pre),
        "scorer": FakeDeployment(score=score),
        "preparer": preparer,
        "preparer_metrics": Records(),
    }


@pytest.mark.parametrize("field, choose", [("tokenize_in_ingress", tokenized_in_ingress),
                                           ("bundle_scorer_calls", bundled_scorer_calls)])
def test_default_follows_the_accelerator(field, choose):
    cfg = AppArgs.model_validate({"models": [
        {"id": "a", "source": "x"},
        {"id": "b", "source": "y", field: False},
        {"id": "c", "source": "z", field: True},
    ]})
    assert choose(cfg, use_gpu=False) == ("a", "c")  # CPU: on unless turned off
    assert choose(cfg, use_gpu=True) == ("c",)  # GPU: off unless turned on


def test_text_chunk_is_tokenized_in_the_ingress(preparer, tiny_text):
    prep = PrepareRequest(query="what ranks passages", documents=[("a cross-encoder scores pairs", None),
                                                                  ("bananas are yellow " * 40, None)],
                          max_tokens_per_doc=30)
    pre, score = FakeMethod("unused"), Recording(CHUNK)
    handles = _handles(preparer, score, pre)
    sc = asyncio.run(ingress_without_replica()._score_chunk(handles, prep))
    assert sc is CHUNK and pre.calls == 0  # no preprocess hop
    [(enc,)] = score.args
    want = load_reranker(tiny_text, device="cpu", load_weights=False).encode(
        prep.query, [t for t, _ in prep.documents], max_tokens_per_doc=30
    )
    np.testing.assert_array_equal(enc.ids, want.ids)
    np.testing.assert_array_equal(enc.lengths, want.lengths)
    assert enc.truncated == want.truncated == [1]  # the long document was cut, and that is reported
    assert enc.ids.dtype == np.int32
    assert len(handles["preparer_metrics"].calls) == 1  # preprocess latency is still recorded


def test_chunk_with_an_image_still_goes_to_preprocess(preparer):
    prep = PrepareRequest(query="q", documents=[("caption", PNG_1PX)])
    pre, score = FakeMethod("encoded"), Recording(CHUNK)
    assert asyncio.run(ingress_without_replica()._score_chunk(_handles(preparer, score, pre), prep)) is CHUNK
    assert pre.calls == 1
    [(chained,)] = score.args
    assert isinstance(chained, FakeResponse)  # the tiles go from preprocess to the scorer un-awaited


def test_bad_input_is_the_same_clear_error(preparer):
    score = Recording(CHUNK)
    prep = PrepareRequest(query="word " * 40, documents=[("d", None)])
    with pytest.raises(InvalidInput) as e:
        asyncio.run(ingress_without_replica()._score_chunk(_handles(preparer, score, FakeMethod("unused")), prep))
    assert "over the limit of 16" in str(e.value) and e.value.param == "query"
    too_long = PrepareRequest(query="q", documents=[("d", None)], max_length=10**6)
    with pytest.raises(InvalidInput, match="truncate_prompt_tokens"):
        asyncio.run(ingress_without_replica()._score_chunk(_handles(preparer, score, FakeMethod("unused")), too_long))
    assert score.args == []  # nothing reached the scorer
