"""Fractional GPUs, autoscaling under a burst, metrics, and batching that never changes a score."""

from __future__ import annotations

import concurrent.futures as cf
import time
import urllib.request

import numpy as np
import pytest
from ray import serve

from deployments.app import build_app
from deployments.protocol import RankingResponse
from tests.conftest import config_args

MODEL = "nvidia/llama-nemotron-rerank-1b-v2"


def _text_only_args(tiny_text: str, scorer: dict) -> dict:
    args = config_args({"text": tiny_text, "vl": tiny_text})
    text = next(m for m in args["models"] if m["name"] == "text")
    text["preprocess"] = {"num_cpus": 0.1, "num_replicas": 1}
    text["scorer"] = {"num_cpus": 0.1, **scorer}
    args["models"] = [text]
    args["ingress"] = {"num_cpus": 0.1, "num_replicas": 1}
    args["accelerator"] = "gpu"
    return args


def test_four_quarter_gpu_scorers_share_one_gpu(service, tiny_text, ray_cluster):
    serve.run(build_app(_text_only_args(tiny_text, {"num_gpus": 0.25, "num_replicas": 4})), name="packing",
              route_prefix="/packing")
    try:
        h = serve.get_deployment_handle("Scorer-text", "packing")
        seen = {}
        deadline = time.monotonic() + 60
        while len(seen) < 4 and time.monotonic() < deadline:
            stats = h.stats.remote().result(timeout_s=30)
            seen[stats["pid"]] = stats
        assert len(seen) == 4, "expected four scorer replicas"
        gpu_ids = {tuple(s["gpu_ids"]) for s in seen.values()}
        assert len(gpu_ids) == 1 and len(next(iter(gpu_ids))) == 1, gpu_ids  # one and the same GPU
        assert all(s["device"] == "cpu" for s in seen.values())  # torch sees no CUDA here: clean fallback
        # what Ray granted each replica (not a before/after diff of the cluster: other apps scale meanwhile)
        assert [s["assigned_resources"].get("GPU") for s in seen.values()] == [0.25] * 4
        assert sum(s["assigned_resources"]["GPU"] for s in seen.values()) == pytest.approx(1.0)
    finally:
        serve.delete("packing")


def _replicas(app: str, deployment: str) -> int:
    st = serve.status().applications[app].deployments[deployment]
    return st.replica_states.get("RUNNING", 0)


def test_scorer_scales_out_under_a_burst_and_back_in(service, tiny_text):
    scorer = {
        "num_gpus": 0,
        "max_batch_tokens": 1024,
        "batch_token_unit": 256,
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                        "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2},
    }
    args = _text_only_args(tiny_text, scorer)
    args["accelerator"] = "cpu"
    args["limits"]["docs_per_chunk"] = 2
    serve.run(build_app(args), name="burst", route_prefix="/burst")
    try:
        assert _replicas("burst", "Scorer-text") == 1
        url = service.base_url + "/burst/v1/rerank"
        docs = [("protein " * 60) + str(i) for i in range(16)]
        stop = time.monotonic() + 45
        peak = 1

        def hammer() -> int:
            import httpx

            n = 0
            with httpx.Client(timeout=120) as c:
                while time.monotonic() < stop:
                    r = c.post(url, json={"query": "q", "documents": docs})
                    n += r.status_code == 200
                    if peak >= 2:
                        break
            return n

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(hammer) for _ in range(8)]
            while time.monotonic() < stop and peak < 2:
                peak = max(peak, _replicas("burst", "Scorer-text"))
                time.sleep(0.5)
            done = sum(f.result() for f in futures)
        assert peak >= 2, "the scorer did not scale out under load"
        assert done > 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _replicas("burst", "Scorer-text") > 1:
            time.sleep(1)
        assert _replicas("burst", "Scorer-text") == 1, "the scorer did not scale back in"
    finally:
        serve.delete("burst")


def test_scores_do_not_depend_on_batch_company(service):
    """The same request alone and amid concurrent traffic of other lengths gets the same logits."""
    import httpx

    docs = ["short", "a medium length passage about protein intake", "long " * 300, "x" * 40]
    body = {"model": MODEL, "query": {"text": "protein"}, "passages": [{"text": d} for d in docs]}

    def logits() -> list[float]:
        r = httpx.post(service.base_url + "/v1/ranking", json=body, timeout=120)
        got = {x.index: x.logit for x in RankingResponse.model_validate(r.json()).rankings}
        return [got[i] for i in range(len(docs))]

    alone = logits()
    noise_docs = [("noise " * k) for k in (1, 50, 200, 400)]

    def noise() -> None:
        httpx.post(service.base_url + "/v1/rerank", json={"query": "other", "documents": noise_docs}, timeout=120)

    with cf.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(noise) for _ in range(8)] + [pool.submit(logits) for _ in range(4)]
        together = [f.result() for f in futs[8:]]
    for t in together:
        np.testing.assert_allclose(t, alone, atol=1e-5, rtol=0)


def test_cpu_ingress_bundles_small_chunks_without_changing_a_score(service, tiny_text):
    """On CPU the ingress sends small chunks of concurrent requests to the scorer in shared calls (score_many,
    counted in the scorer's stats); every request still gets the logits it gets alone, and a bad request among
    them fails alone."""
    import httpx

    args = _text_only_args(tiny_text, {"num_gpus": 0})
    args["accelerator"] = "cpu"
    serve.run(build_app(args), name="bundles", route_prefix="/bundles")
    try:
        url = service.base_url + "/bundles/v1/ranking"
        scorer = serve.get_deployment_handle("Scorer-text", app_name="bundles")

        def logits(k: int) -> list[float]:
            body = {"model": MODEL, "query": {"text": f"query {k % 5}"}, "passages": [{"text": f"passage {k % 7}"}]}
            r = httpx.post(url, json=body, timeout=120)
            assert r.status_code == 200, r.text
            return [x.logit for x in RankingResponse.model_validate(r.json()).rankings]

        alone = {k: logits(k) for k in range(35)}  # every (query, passage) combination, one at a time
        before = scorer.stats.remote().result()["bundles"]
        deadline = time.monotonic() + 60
        with cf.ThreadPoolExecutor(12) as pool:
            while True:
                futs = {k: pool.submit(logits, k) for k in range(36)}
                bad = pool.submit(httpx.post, url, json={"model": MODEL, "query": {"text": "q"}, "passages": []},
                                  timeout=120)
                for k, f in futs.items():
                    np.testing.assert_allclose(f.result(), alone[k % 35], atol=1e-5, rtol=0)
                assert bad.result().status_code == 400
                after = scorer.stats.remote().result()["bundles"]
                if after["calls"] > before["calls"] or time.monotonic() > deadline:
                    break
        assert after["calls"] > before["calls"], "no chunks were bundled"
        assert after["chunks"] - before["chunks"] >= 2 * (after["calls"] - before["calls"])
    finally:
        serve.delete("bundles")


def test_metrics_are_exported(service, ray_cluster):
    service.client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    want = ["ray_rerank_requests_total", "ray_rerank_pairs_scored_total", "ray_rerank_batch_tokens_bucket",
            "ray_rerank_forward_latency_ms_bucket", "ray_rerank_preprocess_latency_ms_bucket",
            "ray_rerank_padding_ratio", "ray_rerank_queue_wait_ms_bucket", "ray_rerank_request_latency_ms_bucket"]
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10).read().decode()
        if all(w in text for w in want):
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, missing
    line = next(x for x in text.splitlines() if x.startswith("ray_rerank_requests_total{"))
    assert 'route="/v1/rerank"' in line or "route=" in line


def _score_chunks_at_once(tiny_text, scorer_cfg: dict, n_chunks: int, wrap, docs: int = 1, wrap_pass=None) -> tuple:
    """A CPU Scorer (in this process) with ``scorer_cfg``; ``n_chunks`` chunks of ``docs`` ~120-token pairs
    submitted at once,
    with ``wrap(forward_rows)`` standing in for the reranker's forward (and ``wrap_pass(_forward_pass)`` for
    its packed passes, when given). -> (scorer, results, logits alone).
    The scorer sets torch's thread count for the process: it is restored afterwards."""
    import asyncio

    import torch

    from deployments.scorer import Scorer

    model = next(m for m in config_args({"text": tiny_text, "vl": tiny_text})["models"] if m["name"] == "text")
    threads = torch.get_num_threads()
    s = Scorer.func_or_class(model, {"num_cpus": 0.1, **scorer_cfg}, False)
    try:
        passage = "protein intake " * 50
        # the first document of chunk i is f"passage {i} {passage}" (tests score it again on their own)
        texts = [[f"passage {i} {passage}"] + [f"passage {i}.{k} {passage}" for k in range(1, docs)]
                 for i in range(n_chunks)]
        encs = [s.reranker.encode(f"query {i}", texts[i]) for i in range(n_chunks)]
        assert all(100 * docs <= e.total_tokens <= 128 * docs for e in encs), [e.total_tokens for e in encs]
        alone = [s.reranker.finalize(e, s.reranker.forward_encoded(e)) for e in encs]
        s.reranker.forward_rows = wrap(s.reranker.forward_rows)
        if wrap_pass is not None:
            s.reranker._forward_pass = wrap_pass(s.reranker._forward_pass)

        async def all_at_once():
            return await asyncio.gather(*(s.score(e) for e in encs))

        return s, asyncio.run(all_at_once()), alone
    finally:
        s._forward_pool.shutdown()
        torch.set_num_threads(threads)


def test_fifo_budget_counts_tokens_not_units(ray_cluster, tiny_text):
    """Four ~120-token chunks share one 512-token CPU batch (in 256-token units only two would), no batch
    goes over the budget, and every chunk's logits equal its logits scored alone."""
    import torch

    threads = torch.get_num_threads()
    batches: list[int] = []

    def wrap(forward):
        def recording(rows, *a, **k):
            batches.append(sum(len(r) for r in rows))
            return forward(rows, *a, **k)

        return recording

    cfg = {"torch_threads": threads, "cpu_threads_per_pass": threads, "max_batch_tokens": 512,  # one batch at a time
           "cpu_forward_tokens": 512, "batch_token_unit": 256, "batch_wait_timeout_s": 0.2}
    _, got, alone = _score_chunks_at_once(tiny_text, cfg, 5, wrap)
    assert sum(batches) == sum(g.tokens for g in got)
    assert max(batches) <= 512 and len(batches) == 2, batches  # the first alone (idle replica), then 4 together
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g.logits, a, atol=1e-5, rtol=0)


def test_cpu_scorer_runs_one_thread_passes_side_by_side(ray_cluster, tiny_text):
    """torch_threads 2 on CPU: two batches run at once, each pass on one torch thread when another batch runs
    beside it or waits, on both threads when the replica has it to itself; logits equal those scored alone."""
    import threading

    import torch

    calls: list[tuple[int, int]] = []  # (torch threads in the pass, batches already running when it started)
    state = {"active": 0, "most": 0, "threads": set()}
    lock = threading.Lock()

    def wrap(forward):
        def recording(rows, *a, **k):
            with lock:
                calls.append((torch.get_num_threads(), state["active"]))
                state["active"] += 1
                state["most"] = max(state["most"], state["active"])
                state["threads"].add(threading.get_ident())
            try:
                out = forward(rows, *a, **k)
                time.sleep(0.3)  # hold the slot so the next batch must start beside this one
                return out
            finally:
                with lock:
                    state["active"] -= 1

        return recording

    cfg = {"torch_threads": 2, "max_batch_tokens": 512, "cpu_forward_tokens": 512, "batch_wait_timeout_s": 0.05}
    s, got, alone = _score_chunks_at_once(tiny_text, cfg, 9, wrap)
    assert s.concurrent_batches == 2
    assert state["most"] == 2 and len(state["threads"]) == 2, (state, calls)
    # the first batch started with 5 more chunks queued, the second beside it: one thread each
    assert calls[0][0] == 1 and calls[1] == (1, 1), calls
    assert all(threads == 1 for threads, running in calls if running), calls
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g.logits, a, atol=1e-5, rtol=0)
    assert sum(s.pass_threads.values()) == len(calls)


@pytest.mark.parametrize("min_tokens, threads", [(100, 2), (None, 1)])
def test_cpu_scorer_gives_a_big_enough_lone_batch_every_thread(ray_cluster, tiny_text, min_tokens, threads):
    """A chunk that finds the CPU replica idle (nothing running, nothing queued) runs on all torch_threads if
    it has at least cpu_lone_batch_min_tokens tokens; this ~120-token one runs on one thread under the
    default of 256. Its logits are the same either way."""
    import torch

    seen: list[int] = []

    def wrap(forward):
        def recording(rows, *a, **k):
            seen.append(torch.get_num_threads())
            return forward(rows, *a, **k)

        return recording

    cfg = {"torch_threads": 2, "max_batch_tokens": 512, "cpu_forward_tokens": 512}
    if min_tokens is not None:
        cfg["cpu_lone_batch_min_tokens"] = min_tokens
    s, got, alone = _score_chunks_at_once(tiny_text, cfg, 1, wrap)
    assert seen == [threads] and s.pass_threads == {str(threads): 1}
    np.testing.assert_allclose(got[0].logits, alone[0], atol=1e-5, rtol=0)


def test_cpu_scorer_splits_a_batch_over_its_forward_threads(ray_cluster, tiny_text):
    """A batch of several attention groups (here one chunk of 4 pairs, 2 per group): its groups run side by
    side on the two forward threads, one torch thread each (not one two-thread call), and its logits equal
    those scored alone."""
    import threading

    import torch

    calls: list[tuple[int, int, int]] = []  # (torch threads, pairs, thread id)

    def wrap(forward):
        def recording(rows, *a, **k):
            calls.append((torch.get_num_threads(), len(rows), threading.get_ident()))
            out = forward(rows, *a, **k)
            time.sleep(0.2)  # keep this thread busy: the other pass must go to the other forward thread
            return out

        return recording

    cfg = {"torch_threads": 2, "max_batch_tokens": 1024, "cpu_forward_tokens": 256}
    s, got, alone = _score_chunks_at_once(tiny_text, cfg, 1, wrap, docs=4)
    assert len(calls) == 2 and {c[0] for c in calls} == {1}, calls
    assert sum(c[1] for c in calls) == 4 and len({c[2] for c in calls}) == 2, calls
    assert s.pass_threads == {"1": 2}
    np.testing.assert_allclose(got[0].logits, alone[0], atol=1e-5, rtol=0)


def test_cpu_scorer_runs_each_share_as_passes_of_cpu_thread_tokens(ray_cluster, tiny_text):
    """cpu_thread_tokens 128, attention groups of one ~120-token pair: a chunk of 4 pairs is split into two
    shares, one per forward thread, and each share runs as two one-pair passes; logits equal those scored
    alone."""
    import threading

    calls: list[int] = []  # forward thread of each share
    passes: list[int] = []  # tokens of each pass

    def wrap(forward):
        def recording(rows, *a, **k):
            calls.append(threading.get_ident())
            out = forward(rows, *a, **k)
            time.sleep(0.2)  # keep this thread busy: the other share must go to the other forward thread
            return out

        return recording

    def wrap_pass(forward_pass):
        def recording(groups):
            passes.append(sum(len(r) for g in groups for r in g))
            return forward_pass(groups)

        return recording

    cfg = {"torch_threads": 2, "cpu_thread_tokens": 128, "attention_group_tokens": 128}
    s, got, alone = _score_chunks_at_once(tiny_text, cfg, 1, wrap, docs=4, wrap_pass=wrap_pass)
    assert s.reranker.max_batch_tokens == 128
    assert len(calls) == 2 and len(set(calls)) == 2, calls
    assert len(passes) == 4 and all(100 <= n <= 128 for n in passes), passes
    np.testing.assert_allclose(got[0].logits, alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["text", "vl"])
def test_scorer_loads_and_runs_its_model_on_one_thread(service, name):
    """torch's OpenMP runtime gives each thread that runs parallel work its own team; with more team threads
    than CPUs its workers barely spin before sleeping. So the model is loaded on the forward thread itself."""
    model = {"text": MODEL, "vl": "nvidia/llama-nemotron-rerank-vl-1b-v2"}[name]
    service.client.post("/v1/ranking", json={"model": model, "query": {"text": "q"},
                                             "passages": [{"text": "a"}, {"text": "b"}]})
    stats = serve.get_deployment_handle(f"Scorer-{name}", "rerank").stats.remote().result(timeout_s=30)
    assert stats["load_thread"].startswith(f"{stats['pid']}:")
    assert stats["forward_threads"] == [stats["load_thread"]]
    assert stats["concurrent_batches"] == 1  # num_cpus 0.1: one thread, so one pass at a time
    assert stats["scripted_layers"] is (name == "text")  # cpu_script_layers: on by default for the text model
    # forward accounting: this request's batch at least (the warm-up pass is not a batch)
    fwd = stats["forward"]
    assert fwd["batches"] >= 1 and fwd["pairs"] >= 2 and fwd["tokens"] > fwd["pairs"]
    assert 0 < fwd["cpu_s"] <= fwd["wall_s"] + 0.01 and fwd["wall_s"] < stats["uptime_s"]


def test_cpu_scorer_with_compile_runs_fused_elementwise_kernels(ray_cluster, tiny_text, text_reranker):
    """compile on a CPU text scorer: the elementwise kernels are compiled at start and batches
    of concurrent chunks score as the eager model does, on two one-thread passes at once."""
    cfg = {"torch_threads": 2, "compile": True, "max_batch_tokens": 512, "cpu_forward_tokens": 512,
           "batch_wait_timeout_s": 0.05}
    s, got, _ = _score_chunks_at_once(tiny_text, cfg, 6, lambda forward: forward)
    assert s.fused_elementwise is True
    passage = "protein intake " * 50
    for i, g in enumerate(got):
        want = text_reranker.score(f"query {i}", [f"passage {i} {passage}"])
        np.testing.assert_allclose(g.logits, want, atol=1e-5, rtol=0)


def test_cpu_scorer_with_script_layers_off_runs_eager_passes_with_the_same_scores(ray_cluster, tiny_text):
    """cpu_script_layers: false keeps a CPU text scorer's packed passes in the eager modules; batches of
    concurrent chunks score the same either way (the scripted path's own parity is in the unit tests)."""
    cfg = {"torch_threads": 2, "cpu_script_layers": False, "max_batch_tokens": 512, "cpu_forward_tokens": 512}
    s, got, alone = _score_chunks_at_once(tiny_text, cfg, 4, lambda forward: forward)
    assert s.reranker.model.model.scripted is False  # (stats() needs a Ray worker; the serve test above reads it)
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g.logits, a, atol=1e-5, rtol=0)
