"""benchmarks/loadgen.py's accounting: pairs, latencies and errors counted, and a run that runs out of
generated requests before its duration says so instead of silently reporting a shorter, thinner run. The load
goes over real HTTP to a small aiohttp server on a free local port."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cpu_split  # noqa: E402
import loadgen  # noqa: E402
from tests.local_http import rerank_server  # noqa: E402


def _run(requests: list, concurrency: int, duration: float, fail_every: int = 0, trace: bool = False,
         cpu: bool = False) -> dict:
    """loadgen.run_cell against a rerank-shaped server (0.01 s per request; every ``fail_every``-th answers 503)
    that counts the requests after the warm-up one (two documents) and checks each body."""
    seen = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        assert request.headers["Content-Type"] == "application/json" and body["model"] == "m"
        if len(body["documents"]) == 2 and body["query"] == requests[-1][0]:
            return web.json_response({"results": []})  # the warm-up request, outside the clock
        seen["n"] += 1
        k = seen["n"]
        await asyncio.sleep(0.01)
        if fail_every and k % fail_every == 0:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"results": [{"index": i} for i in range(len(body["documents"]))]})

    async def main() -> dict:
        async with rerank_server(handler) as url:
            return await loadgen.run_cell(url, "/v1/rerank", "m", requests, concurrency, duration, timeout=5.0,
                                          trace=trace, cpu=cpu)

    res = asyncio.run(main())
    assert seen["n"] == res["requests_ok"] + sum(res["errors"].values())  # the server saw every counted request
    return res


def _requests(n: int, docs: int = 3) -> list[tuple[str, list[str]]]:
    return [(f"q{i}", [f"d{i}-{k}" for k in range(docs)]) for i in range(n)]


def test_a_run_that_runs_out_of_requests_says_so(capsys):
    res = _run(_requests(5), concurrency=2, duration=5.0)
    assert res["ran_out_of_requests"] is True
    assert res["requests_ok"] == 5 and res["errors"] == {}
    assert res["seconds"] < 5.0  # ended early: the requests ran out, not the clock
    assert "raise --max-requests" in capsys.readouterr().err


def test_a_full_run_counts_pairs_and_errors():
    res = _run(_requests(10_000), concurrency=4, duration=0.5, fail_every=4)
    assert res["ran_out_of_requests"] is False
    assert res["requests_ok"] > 0 and res["errors"].get("503", 0) > 0
    assert res["pairs_per_s"] * res["seconds"] == pytest.approx(3 * res["requests_ok"], rel=1e-2)


def test_trace_lists_every_request_with_its_status():
    res = _run(_requests(12), concurrency=3, duration=5.0, fail_every=4, trace=True)
    rows = res["requests"]
    assert len(rows) == 12 == res["requests_ok"] + sum(res["errors"].values())
    assert [r[3] for r in rows].count("503") == 3
    assert all(r[2] == 3 and r[1] >= 0.01 for r in rows)  # documents, and at least the handler's sleep
    assert [r[0] for r in rows] == sorted(r[0] for r in rows) and rows[0][0] >= 0
    untraced = _run(_requests(3), concurrency=1, duration=5.0)
    assert "requests" not in untraced


def test_steady_throughput_counts_only_the_window_at_full_concurrency():
    # 3 pairs per request, 0.01 s each, 2 workers: about 600 pairs/s whatever the window
    res = _run(_requests(100_000), concurrency=2, duration=0.8, trace=True)
    in_window = sum(d for t, lat, d, k in res["requests"] if 0.2 <= t + lat < 0.8)
    assert res["steady_pairs_per_s"] == pytest.approx(in_window / 0.6, rel=0.05)
    assert res["steady_pairs_per_s"] > 0
    assert res["steady_pairs_per_s"] >= 0.5 * res["pairs_per_s"]


def test_cpu_split_names_processes_by_kind_not_pid():
    assert cpu_split.label(["ray::ServeReplica:rerank:Scorer-text"]) == "ServeReplica:rerank:Scorer-text"
    assert cpu_split.label(["ray::ServeController.listen_for_change"]) == "ServeController"
    assert cpu_split.label(["VLLM::Worker"]) == "VLLM::Worker"
    assert cpu_split.label(["/v/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--port", "1"]) == \
        "vllm.entrypoints.openai.api_server"
    assert cpu_split.label(["/v/bin/python", "benchmarks/loadgen.py", "--url", "u"]) == "loadgen.py"
    assert cpu_split.label(["/usr/sbin/haproxy", "-f", "x.cfg"]) == "haproxy"
    assert cpu_split.label([]) == "?"


def test_cpu_split_sees_a_busy_process(tmp_path):
    script = tmp_path / "busy_cpu_probe.py"
    script.write_text("import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end:\n    pass\n")
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        time.sleep(0.3)
        a, t0 = cpu_split.snapshot(), time.monotonic()
        time.sleep(1.0)
        b, t1 = cpu_split.snapshot(), time.monotonic()
    finally:
        proc.kill()
        proc.wait()
    cores = cpu_split.split(a, b, t1 - t0)
    assert 0.3 < cores["busy_cpu_probe.py"] <= 1.1  # one busy thread: up to one core
    assert list(cores.values())[0] == max(cores.values())  # largest first


def test_cpu_split_is_empty_without_proc(monkeypatch):
    def no_proc(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(cpu_split.os, "listdir", no_proc)
    assert cpu_split.snapshot() == {}
    assert cpu_split.split({}, {}, 1.0) == {}


def test_cpu_flag_adds_the_steady_window_split():
    res = _run(_requests(100_000), concurrency=2, duration=0.8, cpu=True)
    cores = res["cpu_cores"]
    assert cores and all(v > 0 for v in cores.values())
    assert sum(cores.values()) <= (os.cpu_count() or 1) + 0.2
    assert "cpu_cores" not in _run(_requests(3), concurrency=1, duration=5.0)
