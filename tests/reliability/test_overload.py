"""Overload and timeouts: bounded queues answer 503 + Retry-After at once; a timed-out request stops its work.

Runs against the ``rel-limits`` app (tests/reliability/conftest.py): the ingress takes six requests at a time
with two more waiting at the proxy, the scorer one chunk with three waiting, a request sends at most two chunks
at once and gives up after 5 s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time

import httpx

from deployments.messages import PrepareRequest, ScoredChunk
from deployments.protocol import ErrorResponse, RerankResponse

from .conftest import good_request
from .fakes import FakeDeployment, FakeMethod, ingress_without_replica

BURST = 32


def _burst(url: str, body: dict, n: int) -> list[tuple[int, dict, str, float]]:
    """n requests released together; (status, headers, text, seconds) each."""
    gate = threading.Barrier(n)

    def one(_: int):
        with httpx.Client(timeout=120) as c:
            gate.wait()
            t0 = time.monotonic()
            r = c.post(url, json=body)
            return r.status_code, dict(r.headers), r.text, time.monotonic() - t0

    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _is_envelope(text: str) -> bool:
    try:
        ErrorResponse.model_validate_json(text)
        return True
    except ValueError:
        return False


def test_overload_is_refused_quickly_with_retry_after(aux):
    url = aux.url("rel-limits", "/v1/rerank")
    docs = [f"passage {i}: " + "protein intake for adults " * 12 for i in range(16)]  # two chunks of eight
    results = _burst(url, {"query": "how much protein?", "documents": docs}, BURST)
    statuses = [s for s, _, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert ok, "nothing was served"
    assert len(refused) >= BURST // 2, statuses  # 8 fit (6 running, 2 waiting at the proxy); the rest cannot
    for status, headers, text, seconds in refused:
        assert int(headers["retry-after"]) >= 1, headers
        assert seconds < 10, f"a refusal took {seconds:.1f} s"
    # both hops shed load: the proxy in front of the full ingress (Serve's plain-text 503), and the ingress
    # when the scorer's queue is full (the service's JSON envelope, type server_overloaded)
    ours = [ErrorResponse.model_validate_json(t) for _, _, t, _ in refused if _is_envelope(t)]
    assert any(e.type == "server_overloaded" and "retry" in e.message for e in ours), [t for _, _, t, _ in refused]
    assert len(ours) < len(refused), "the proxy refused nothing"
    for _, _, text, seconds in ok:
        assert len(RerankResponse.model_validate_json(text).results) == len(docs)
        assert seconds < 60  # accepted requests finished within the request timeout
    # the burst is over: the service takes requests again
    r = good_request(aux.base_url, prefix="/rel-limits")
    assert r.status_code == 200, r.text


PREP = PrepareRequest(query="q", documents=[("d", None)], request_id="rid-2")
CHUNK = ScoredChunk(logits=None, tokens=3)


def test_a_request_has_at_most_its_slots_in_flight():
    """limits.max_chunks_in_flight: the other chunks wait in the ingress, where cancelling them costs nothing."""
    in_flight = peak = 0

    async def prepare():
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return "encoded"

    pre = FakeMethod(prepare)
    handles = {"preprocess": FakeDeployment(prepare=pre), "scorer": FakeDeployment(score=FakeMethod(CHUNK))}
    ingress = ingress_without_replica()

    async def all_chunks():
        slots = asyncio.Semaphore(3)
        return await asyncio.gather(*(ingress._score_chunk(handles, PREP, slots) for _ in range(10)))

    assert asyncio.run(all_chunks()) == [CHUNK] * 10
    assert peak == 3 and pre.calls == 10

    hanging = FakeMethod("hang")
    handles["preprocess"] = FakeDeployment(prepare=hanging)

    async def cancelled_request():
        slots = asyncio.Semaphore(2)
        tasks = [asyncio.ensure_future(ingress._score_chunk(handles, PREP, slots)) for _ in range(10)]
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(cancelled_request())
    assert hanging.calls == 2  # the eight waiting chunks were never sent


def test_request_timeout_is_504_and_cancels_the_work(aux):
    url = aux.url("rel-limits", "/v1/rerank")
    # 1000 documents of about 1000 tokens: a million tokens, tens of seconds of scoring on this machine
    docs = [f"{i} " + "protein " * 1000 for i in range(1000)]
    t0 = time.monotonic()
    r = httpx.post(url, json={"query": "protein", "documents": docs}, timeout=120)
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text[:300]
    err = ErrorResponse.model_validate(r.json())
    assert err.type == "timeout_error" and "did not finish within 5 s" in err.message
    assert took < 5 + 10, f"the 504 came after {took:.1f} s"
    # the work behind it stopped: once the (at most two) chunk calls in flight end, a small request is served well
    # within the 5 s timeout (left running, the big request's work would hold it up for tens of seconds)
    time.sleep(1.0)
    small = {"query": "protein", "documents": ["46 grams a day", "a mountain summit"]}
    t0 = time.monotonic()
    r = httpx.post(url, json=small, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert time.monotonic() - t0 < 5
    assert len(RerankResponse.model_validate(r.json()).results) == 2


def test_a_client_that_disconnects_stops_its_work(aux):
    """No server timeout needed for abandoned requests: the proxy cancels the request when its client goes away,
    and the ingress cancels the chunks behind it (so limits.request_timeout_s can stay a generous last resort)."""
    from ray import serve

    scorer = serve.get_deployment_handle("Scorer-text", "rel-limits")

    def pairs() -> int:
        return scorer.stats.remote().result(timeout_s=30)["forward"]["pairs"]

    url = aux.url("rel-limits", "/v1/rerank")
    docs = [f"{i} " + "protein " * 1000 for i in range(1000)]  # tens of seconds of scoring, in chunks of 8
    before = pairs()
    t0 = time.monotonic()
    try:
        httpx.post(url, json={"query": "protein", "documents": docs}, timeout=1.5)
        raise AssertionError("the request finished within 1.5 s")
    except httpx.TimeoutException:
        pass  # the client gave up and closed its connection
    time.sleep(0.5)  # the calls in flight when it left (at most two chunks) finish
    settled = pairs()
    time.sleep(1.5)
    after = pairs()
    assert time.monotonic() - t0 < 5, "too slow to tell a cancellation from the 5 s request timeout"
    assert settled > before, "no work had started"
    # still scoring, the request would have added ~50 pairs a second (112 in its first 2 s on the dev machine)
    assert after - settled <= 8, (before, settled, after)
