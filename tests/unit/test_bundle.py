"""The ingress's scorer-call bundler (deployments/bundle.py): small chunks that arrive in the same loop turn go as
one ``score_many`` call, each caller gets its own answer or error, a lone chunk goes as ``score`` without delay,
and bundles stay under their chunk and token caps. Driven against stand-in handles (no Ray)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments import bundle
from deployments.bundle import ScoreBundler
from deployments.messages import PrepareRequest, ScoredChunk
from rerank_core.errors import InvalidInput
from rerank_core.tokenization import EncodedPairs
from tests.reliability.fakes import FakeResponse, ingress_without_replica


def _enc(tag: int, tokens: int = 10) -> EncodedPairs:
    return EncodedPairs(ids=np.full(tokens, tag, np.int32), lengths=np.array([tokens]), doc_index=np.array([0]),
                        num_docs=1)


def _answer(enc: EncodedPairs) -> ScoredChunk:
    return ScoredChunk(logits=np.array([float(enc.ids[0])], np.float32), tokens=enc.total_tokens)


class Scorer:
    """``score`` / ``score_many`` stand-ins that answer each chunk with its tag as the logit; chunks tagged
    negative fail with InvalidInput (in their place in a bundle), and ``fail_calls`` fails whole calls."""

    def __init__(self, fail_calls: BaseException | None = None):
        self.calls: list[list[int]] = []
        self.fail_calls = fail_calls
        self.score = self._Method(self, many=False)
        self.score_many = self._Method(self, many=True)

    class _Method:
        def __init__(self, owner: "Scorer", many: bool):
            self.owner, self.many = owner, many

        def remote(self, arg):
            encs = arg if self.many else [arg]
            self.owner.calls.append([int(e.ids[0]) for e in encs])
            if self.owner.fail_calls is not None:
                return FakeResponse(self.owner.fail_calls)
            out = [InvalidInput("bad chunk") if e.ids[0] < 0 else _answer(e) for e in encs]
            if not self.many:
                return FakeResponse(out[0])
            return FakeResponse(out)


async def _submit_all(b: ScoreBundler, encs: list[EncodedPairs]) -> list:
    futs = [b.submit(e) for e in encs]
    return await asyncio.gather(*futs, return_exceptions=True)


def test_chunks_of_one_turn_share_a_call_and_each_gets_its_own_answer():
    s = Scorer()
    b = ScoreBundler(s)
    out = asyncio.run(_submit_all(b, [_enc(k) for k in (1, 2, 3)]))
    assert s.calls == [[1, 2, 3]]  # one score_many call
    assert [float(r.logits[0]) for r in out] == [1.0, 2.0, 3.0]
    assert (b.calls, b.chunks) == (1, 3)


def test_a_lone_chunk_goes_as_score_at_once():
    s = Scorer()
    b = ScoreBundler(s)

    async def main():
        first = await b.submit(_enc(5))
        second = await b.submit(_enc(6))  # a later turn: its own call
        return first, second

    first, second = asyncio.run(main())
    assert s.calls == [[5], [6]] and float(first.logits[0]) == 5.0 and float(second.logits[0]) == 6.0


def test_bundles_respect_the_chunk_and_token_caps():
    s = Scorer()
    b = ScoreBundler(s)
    n = bundle.BUNDLE_MAX_CHUNKS + 3
    out = asyncio.run(_submit_all(b, [_enc(k, tokens=10) for k in range(1, n + 1)]))
    assert [len(c) for c in s.calls] == [bundle.BUNDLE_MAX_CHUNKS, 3]
    assert [float(r.logits[0]) for r in out] == [float(k) for k in range(1, n + 1)]
    s2 = Scorer()
    big = bundle.BUNDLE_MAX_TOKENS // 2 - 1  # two fit under the cap, the third starts a new call
    asyncio.run(_submit_all(ScoreBundler(s2), [_enc(k, tokens=big) for k in (1, 2, 3)]))
    assert s2.calls == [[1, 2], [3]]


def test_only_small_chunks_are_bundled():
    b = ScoreBundler(Scorer())
    assert b.bundles(_enc(1, tokens=bundle.BUNDLE_CHUNK_TOKENS))
    assert not b.bundles(_enc(1, tokens=bundle.BUNDLE_CHUNK_TOKENS + 1))


def test_one_bad_chunk_fails_alone_and_a_failed_call_fails_its_chunks():
    s = Scorer()
    out = asyncio.run(_submit_all(ScoreBundler(s), [_enc(1), _enc(-1), _enc(2)]))
    assert isinstance(out[1], InvalidInput)
    assert float(out[0].logits[0]) == 1.0 and float(out[2].logits[0]) == 2.0
    lost = ScoreBundler(Scorer(fail_calls=ConnectionError("replica died")))
    out = asyncio.run(_submit_all(lost, [_enc(1), _enc(2)]))
    assert all(isinstance(r, ConnectionError) for r in out)


def test_a_wrong_number_of_answers_fails_the_chunks_instead_of_hanging():
    class Short:
        class score_many:
            @staticmethod
            def remote(encs):
                return FakeResponse([_answer(encs[0])])  # one answer for two chunks

    out = asyncio.run(_submit_all(ScoreBundler(Short()), [_enc(1), _enc(2)]))
    assert all(isinstance(r, RuntimeError) and "answered 1 chunks of 2" in str(r) for r in out)


def test_a_requests_chunks_never_share_a_call():
    s = Scorer()
    b = ScoreBundler(s)

    async def main():
        futs = [b.submit(_enc(1), "r1"), b.submit(_enc(2), "r1"), b.submit(_enc(3), "r2"), b.submit(_enc(4), "")]
        return await asyncio.gather(*futs)

    out = asyncio.run(main())
    assert s.calls == [[1, 3, 4], [2]]  # r1's second chunk starts a bundle of its own
    assert [float(r.logits[0]) for r in out] == [1.0, 2.0, 3.0, 4.0]


def test_a_caller_that_gave_up_before_the_flush_is_not_sent():
    s = Scorer()
    b = ScoreBundler(s)

    async def main():
        gone = b.submit(_enc(1))
        kept = b.submit(_enc(2))
        gone.cancel()
        return await kept

    assert float(asyncio.run(main()).logits[0]) == 2.0
    assert s.calls == [[2]]


def test_concurrent_ingress_chunks_are_bundled(tiny_text):
    """Two small text chunks scored at once through the ingress's chunk call (tokenized inline) share one
    scorer call, and each request gets its own scores."""
    from deployments.config import LimitsArgs, ModelArgs
    from deployments.prepare import ChunkPreparer

    class Recording:
        def __init__(self):
            self.args: list = []

        def remote(self, arg):
            self.args.append(arg)
            return FakeResponse([ScoredChunk(logits=np.array([float(e.ids.sum())], np.float32), tokens=1) for e in arg])

    class Metrics:
        def record(self, ms, images):
            pass

    many = Recording()

    class Handle:
        score = None
        score_many = many

    preparer = ChunkPreparer(ModelArgs(id="m", source=tiny_text), LimitsArgs())
    handles = {"scorer": Handle(), "preparer": preparer, "preparer_metrics": Metrics(),
               "bundler": ScoreBundler(Handle())}
    ingress = ingress_without_replica()

    async def main():
        return await asyncio.gather(*(
            ingress._score_chunk(handles, PrepareRequest(query=f"query {k}", documents=[(f"passage {k}", None)]))
            for k in range(3)
        ))

    out = asyncio.run(main())
    assert len(many.args) == 1 and len(many.args[0]) == 3  # three chunks, one call
    sums = [float(e.ids.sum()) for e in many.args[0]]  # in submission order: request k's chunk is k-th
    assert len(set(sums)) == 3 and [float(sc.logits[0]) for sc in out] == sums


@pytest.mark.parametrize("chars, inline", [(100, True), (5000, False)])
def test_small_chunks_are_tokenized_on_the_loop_and_big_ones_on_a_thread(tiny_text, monkeypatch, chars, inline):
    import threading

    from deployments import ingress as ingress_mod
    from deployments.config import LimitsArgs, ModelArgs
    from deployments.prepare import ChunkPreparer

    preparer = ChunkPreparer(ModelArgs(id="m", source=tiny_text), LimitsArgs())
    seen = []
    real = preparer.prepare

    def prepare(prep):
        seen.append(threading.current_thread() is threading.main_thread())
        return real(prep)

    monkeypatch.setattr(preparer, "prepare", prepare)

    class One:
        def remote(self, enc):
            return FakeResponse(_answer(enc))

    class Handle:
        score = One()

    class Metrics:
        def record(self, ms, images):
            pass

    handles = {"scorer": Handle(), "preparer": preparer, "preparer_metrics": Metrics()}
    prep = PrepareRequest(query="q", documents=[("word " * (chars // 5), None)])
    assert (ingress_mod._chunk_chars(prep) <= ingress_mod.INLINE_TOKENIZE_CHARS) is inline
    asyncio.run(ingress_without_replica()._score_chunk(handles, prep))
    assert seen == [inline]

