"""Replicas that die: a chunk whose replica died is retried once, a second loss is a clear 503, readiness says
503 (never 500) while no replica can score, and the service recovers.

The first tests drive the ingress's chunk call and readiness check with fake handles (no Ray); the last ones
``ray.kill`` real replicas of the ``rel-faults`` app (two preprocess and two scorer replicas) under load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from deployments.errors import NotReady, Overloaded, domain_error_response, replica_lost
from deployments.messages import PrepareRequest, ScoredChunk
from deployments.protocol import ErrorResponse, RerankResponse
from rerank_core.errors import InvalidInput

from .conftest import kill_replica, replica_actor_names, running_replicas, wait_until
from .fakes import FakeDeployment, FakeMethod, ingress_without_replica

APP = "rel-faults"


CHUNK = ScoredChunk(logits=None, tokens=7)  # what the fake scorer answers
PREP = PrepareRequest(query="q", documents=[("d", None)], request_id="rid-1")

LOST = {
    "actor_died": lambda: ActorDiedError(),
    "actor_unavailable": lambda: ActorUnavailableError("unavailable", b"\x01" * 16),
    "task_error_wrapping_died": lambda: RayTaskError("score", "traceback", ActorDiedError()),
    "serve_upstream_crash": lambda: _caused(RayServeException("an upstream actor died"), ActorDiedError()),
}


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("where", ["preprocess", "scorer"])
@pytest.mark.parametrize("kind", list(LOST))
def test_chunk_whose_replica_died_is_retried_once(where, kind):
    pre = FakeMethod(LOST[kind]() if where == "preprocess" else "encoded", "encoded")
    score = FakeMethod(LOST[kind]() if where == "scorer" else CHUNK, CHUNK)
    handles = {"preprocess": FakeDeployment(prepare=pre), "scorer": FakeDeployment(score=score)}
    ingress = ingress_without_replica()
    ingress._ready_until = time.monotonic() + 3600  # a cached "ready" from before the loss
    assert asyncio.run(ingress._score_chunk(handles, PREP)) is CHUNK
    assert pre.calls == 2  # the retry starts over with fresh handle calls
    assert score.calls == (2 if where == "scorer" else 1)
    assert ingress._ready_until == 0.0  # the next readiness probe checks the replicas again


def test_second_loss_is_a_503_with_retry_after():
    pre = FakeMethod("encoded")
    score = FakeMethod(ActorDiedError(), ActorDiedError(), CHUNK)
    handles = {"preprocess": FakeDeployment(prepare=pre), "scorer": FakeDeployment(score=score)}
    with pytest.raises(NotReady) as e:
        asyncio.run(ingress_without_replica()._score_chunk(handles, PREP))
    assert score.calls == 2  # retried once, not more
    resp = domain_error_response(e.value, "rid-1")
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    body = ErrorResponse.model_validate_json(resp.body)
    assert "replica stopped" in body.message and "retry" in body.message


@pytest.mark.parametrize(
    "error",
    [RayTaskError("prepare", "tb", InvalidInput("bad base64", param="documents")), ValueError("a bug"),
     BackPressureError(num_queued_requests=3, max_queued_requests=2)],
    ids=["domain_error", "bug", "backpressure"],
)
def test_other_errors_are_not_retried(error):
    pre = FakeMethod(error, "encoded")
    score = FakeMethod(CHUNK)
    handles = {"preprocess": FakeDeployment(prepare=pre), "scorer": FakeDeployment(score=score)}
    with pytest.raises(type(error)):
        asyncio.run(ingress_without_replica()._score_chunk(handles, PREP))
    assert pre.calls == 1 and score.calls == 0


def test_cancelling_a_chunk_cancels_the_call_in_flight():
    score = FakeMethod("hang")
    handles = {"preprocess": FakeDeployment(prepare=FakeMethod("encoded")), "scorer": FakeDeployment(score=score)}
    responses = []
    orig = score.remote
    score.remote = lambda *a: responses.append(orig(*a)) or responses[-1]

    async def main():
        task = asyncio.ensure_future(ingress_without_replica()._score_chunk(handles, PREP))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(responses) == 1 and responses[0].cancelled


def test_translate_maps_every_failure_to_a_status():
    from deployments.ingress import Ingress

    tr = Ingress.func_or_class._translate
    assert isinstance(tr(BackPressureError(num_queued_requests=1, max_queued_requests=1)), Overloaded)
    for make in LOST.values():
        err = tr(make())
        assert isinstance(err, NotReady) and domain_error_response(err, "r").status_code == 503
    inner = InvalidInput("bad", param="documents")
    assert tr(RayTaskError("prepare", "tb", inner)) is inner
    generic = tr(ValueError("secret internal detail"))
    resp = domain_error_response(generic, "r-9")
    assert resp.status_code == 500 and b"secret" not in resp.body and b"r-9" in resp.body


def test_replica_lost_classification():
    for make in LOST.values():
        assert replica_lost(make())
    assert not replica_lost(RayTaskError("prepare", "tb", InvalidInput("bad")))
    assert not replica_lost(ValueError("x"))
    assert not replica_lost(BackPressureError(num_queued_requests=1, max_queued_requests=1))


@pytest.mark.parametrize("scorer_ready", [ActorDiedError(), "hang", RayServeException("no replicas")],
                         ids=["dead", "hanging", "unavailable"])
def test_readiness_is_503_while_no_scorer_answers(scorer_ready):
    handles = {"scorer": FakeDeployment(ready=FakeMethod(scorer_ready)),
               "preprocess": FakeDeployment(info=FakeMethod({"kind": "text", "max_length": 8192}))}
    t0 = time.monotonic()
    resp = asyncio.run(ingress_without_replica(handles).ready())
    assert time.monotonic() - t0 < 5  # a hanging replica costs the probe its 2 s timeout, no more
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    assert "not ready" in ErrorResponse.model_validate_json(resp.body).message


def test_readiness_is_200_when_every_model_answers():
    handles = {"scorer": FakeDeployment(ready=FakeMethod(True)),
               "preprocess": FakeDeployment(info=FakeMethod({"kind": "text", "max_length": 8192}))}
    resp = asyncio.run(ingress_without_replica(handles).ready())
    assert resp.status_code == 200 and json.loads(resp.body)["status"] == "ready"


# ----------------------------------------------------------------------------------- real replicas, ray.kill
class Traffic:
    """Clients posting rerank requests in a loop; every outcome recorded (status, seconds, body)."""

    def __init__(self, url: str, clients: int = 3):
        self.url = url
        self.stop = threading.Event()
        self.log: list[tuple[float, int | str, float, str]] = []
        self.pool = cf.ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._run, k) for k in range(clients)]

    def _run(self, k: int) -> None:
        docs = [f"client {k} passage {i}: protein intake for adults" for i in range(40)]  # two chunks
        with httpx.Client(timeout=90) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post(self.url, json={"query": "how much protein?", "documents": docs})
                    outcome, text = r.status_code, r.text
                    if r.status_code == 200:
                        assert len(RerankResponse.model_validate_json(text).results) == len(docs)
                    elif r.status_code == 503:
                        assert int(r.headers["retry-after"]) >= 1
                except httpx.TimeoutException:
                    outcome, text = "hung", ""
                self.log.append((time.monotonic(), outcome, time.monotonic() - t0, text[:300]))

    def ok_since(self, t: float) -> int:
        return sum(1 for ts, s, _, _ in self.log if ts > t and s == 200)

    def finish(self) -> list:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=120)  # re-raises a failed body/header check; a hung client would time out here
        self.pool.shutdown()
        return self.log


def _poll_ready(url: str, stop: threading.Event, seen: list) -> None:
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            r = c.get(url)
            seen.append((time.monotonic(), r.status_code, r.headers.get("retry-after")))
            time.sleep(0.3)


def _statuses(log) -> dict:
    out: dict = {}
    for _, s, _, _ in log:
        out[s] = out.get(s, 0) + 1
    return out


def test_killing_a_scorer_and_a_preprocess_replica_under_load(aux):
    scorers, preps = replica_actor_names(APP, "Scorer-text"), replica_actor_names(APP, "Preprocess-text")
    assert len(scorers) == 2 and len(preps) == 2
    traffic = Traffic(aux.url(APP, "/v1/rerank"))
    ready_seen: list = []
    stop_polling = threading.Event()
    poller = threading.Thread(target=_poll_ready, args=(aux.url(APP, "/v1/health/ready"), stop_polling, ready_seen))
    poller.start()
    try:
        assert wait_until(lambda: traffic.ok_since(0) >= 3, 120), _statuses(traffic.log)
        killed_at = time.monotonic()
        kill_replica(scorers[0])
        time.sleep(1.5)
        kill_replica(preps[0])
        # Serve notices both deaths (a deployment drops below two running replicas), then replaces them
        dipped: set[str] = set()

        def replaced() -> bool:
            counts = {d: running_replicas(APP, d) for d in ("Scorer-text", "Preprocess-text")}
            dipped.update(d for d, n in counts.items() if n < 2)
            return len(dipped) == 2 and all(n == 2 for n in counts.values())

        # generous: a replica takes 15-30 s to start on an idle 2-core machine, 60-100 s late in the full suite
        assert wait_until(replaced, timeout=300, every=0.2), f"not replaced (noticed: {sorted(dipped)})"
        assert scorers[0] not in replica_actor_names(APP, "Scorer-text")
        assert preps[0] not in replica_actor_names(APP, "Preprocess-text")
        back_at = time.monotonic()
        assert wait_until(lambda: traffic.ok_since(back_at) >= 3, 120), _statuses(traffic.log)
    finally:
        log = traffic.finish()
        stop_polling.set()
        poller.join(timeout=60)
    statuses = _statuses(log)
    assert set(statuses) <= {200, 503}, statuses  # no 500, no hung request
    for _, s, _, text in log:
        if s == 503:
            assert "retry" in ErrorResponse.model_validate_json(text).message
    # with a second replica of each up, the lost chunks were retried there: most requests during the fault passed
    during = [s for ts, s, _, _ in log if killed_at <= ts <= back_at]
    assert during.count(200) >= len(during) // 2, statuses
    assert {s for _, s, _ in ready_seen} <= {200, 503}, ready_seen


def test_readiness_while_every_scorer_is_down(aux):
    """Every scorer replica dies: readiness answers 503 with Retry-After until a replacement runs, then 200;
    requests meanwhile end in 200 (retried onto the replacement), 503 or 504, never a 500 or a hang."""
    assert len(replica_actor_names(APP, "Scorer-text")) == 2
    ready_url = aux.url(APP, "/v1/health/ready")
    seen: list = []

    def probe() -> int:
        r = httpx.get(ready_url, timeout=30)
        seen.append((r.status_code, r.headers.get("retry-after")))
        return r.status_code

    def down() -> bool:
        # Serve replaces a killed replica within seconds (a prestarted worker, a tiny model), sometimes before the
        # ingress's readiness cache (5 s) runs out, so one kill may never show: every scorer replica, replacements
        # included, is killed again until readiness has said 503
        for name in replica_actor_names(APP, "Scorer-text"):
            try:
                kill_replica(name)
            except ValueError:  # gone between the listing and the lookup
                pass
        return probe() == 503

    traffic = Traffic(aux.url(APP, "/v1/rerank"), clients=2)
    try:
        assert wait_until(down, timeout=120, every=0.5), seen
        assert wait_until(lambda: probe() == 200, timeout=300, every=0.5), seen
    finally:
        log = traffic.finish()
    assert {s for s, _ in seen} <= {200, 503}, seen
    assert all(int(ra) >= 1 for s, ra in seen if s == 503), seen
    assert set(_statuses(log)) <= {200, 503, 504}, _statuses(log)
    r = httpx.post(aux.url(APP, "/v1/rerank"), json={"query": "q", "documents": ["a", "b"]}, timeout=120)
    assert r.status_code == 200, r.text
