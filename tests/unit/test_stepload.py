"""benchmarks/stepload.py's bookkeeping: step parsing, per-step replica changes, and the timeline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import stepload  # noqa: E402


def test_parse_steps_and_overrides():
    assert stepload.parse_steps("2:40,16:120,0:60") == [(2, 40.0), (16, 120.0), (0, 60.0)]
    for bad in ("", "2:0", "-1:5"):
        with pytest.raises(ValueError):
            stepload.parse_steps(bad)
    assert stepload.parse_overrides("max_replicas=2,downscale_delay_s=30.5") == {
        "max_replicas": 2, "downscale_delay_s": 30.5}


def _sample(t: float, scorer: int) -> dict:
    return {"t": t, "deployments": {"Scorer": {"running": scorer, "states": {}, "target": scorer}}}


def test_summary_reports_when_each_step_changed_the_replicas():
    steps = [(2, 10.0), (8, 10.0), (0, 10.0)]
    bounds = [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    samples = [_sample(t, 1) for t in range(0, 13)] + [_sample(t, 2) for t in range(13, 24)] + \
        [_sample(t, 1) for t in range(24, 30)]
    records = [{"step": 0, "start": 1.0, "end": 3.0, "status": 200, "pairs": 4},
               {"step": 1, "start": 10.0, "end": 11.0, "status": 200, "pairs": 4},
               {"step": 1, "start": 10.0, "end": 12.0, "status": 503, "pairs": 4}]
    out = stepload.summarize(steps, records, samples, bounds)["steps"]
    assert [s["replicas"]["Scorer"]["first_change_s"] for s in out] == [None, 3.0, 4.0]
    assert [(s["replicas"]["Scorer"]["min"], s["replicas"]["Scorer"]["max"]) for s in out] == [(1, 1), (1, 2), (1, 2)]
    assert [s["replicas"]["Scorer"]["at_end"] for s in out] == [1, 2, 1]
    assert out[1]["requests_ok"] == 1 and out[1]["errors"] == 1
    assert out[0]["pairs_per_s"] == pytest.approx(0.4)

    rows = stepload.timeline(records, samples, end=30.0)
    # in flight at each row's midpoint: 1 s (the 1.0-3.0 s request), 3 s (none), 11 s (the 10-12 s one)
    assert [rows[0]["in_flight"], rows[1]["in_flight"], rows[5]["in_flight"]] == [1, 0, 1]
    assert rows[1]["pairs_per_s"] == pytest.approx(1.0)  # 4 pairs ended within the first 4 s
    assert rows[7]["running"] == {"Scorer": 2} and rows[-1]["running"] == {"Scorer": 1}


def test_config_overrides_reach_the_scorer_and_validate(tmp_path):
    """--scorer-autoscaling and --scorer edit the text scorer of serve_config.yaml; the app accepts the result."""
    import yaml

    from deployments.app import scorer_defaults
    from deployments.config import AppArgs

    out = stepload.stepload_config(
        tmp_path / "ckpt", tmp_path / "c.yaml", {"max_replicas": 2}, {"max_ongoing_requests": 8}
    )
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    cfg = AppArgs.model_validate(args)
    (model,) = cfg.models
    assert model.source == str(tmp_path / "ckpt") and cfg.accelerator == "cpu"
    assert model.scorer.max_ongoing_requests == 8
    assert model.scorer.autoscaling.max_replicas == 2
    shipped = yaml.safe_load((Path(stepload.__file__).parents[1] / "serve_config.yaml").read_text())
    text = next(m for m in shipped["applications"][0]["args"]["models"] if m["name"] == "text")
    assert model.scorer.autoscaling.min_replicas == text["scorer"]["autoscaling"]["min_replicas"]
    # without the override the derived default applies, and it is not 8
    plain = AppArgs.model_validate(
        yaml.safe_load(stepload.stepload_config(tmp_path / "ckpt", tmp_path / "d.yaml", {}).read_text())
        ["applications"][0]["args"]
    )
    assert plain.models[0].scorer.max_ongoing_requests is None
    assert scorer_defaults(plain.models[0].scorer, use_gpu=False)[0] != 8


def test_benchmark_service_env_quiets_serve_housekeeping(monkeypatch):
    """The benchmarks run Serve with the README's CPU settings; a value already in the environment wins,
    and both names are ones this Ray release reads (a rename would silently drop them)."""
    import inspect

    import compare
    import ray.serve._private.constants as serve_constants

    for key in compare.QUIET_SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
        assert f'"{key}"' in inspect.getsource(serve_constants)
    env = compare.service_env("high-throughput")
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.2")
    assert compare.service_env("default")["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.2"


def test_run_load_sends_each_step_over_http_and_records_every_request():
    """run_load against a real local aiohttp server: busy steps send fresh requests back to back, an idle step
    sends none, and every request is recorded with its step, status and pairs."""
    import asyncio
    import time

    from aiohttp import web

    from tests.local_http import rerank_server

    class Fresh:
        def __init__(self):
            self.n = 0

        def next(self):
            self.n += 1
            return f"q{self.n}", [f"d{self.n}-a", f"d{self.n}-b"]

    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body["query"])
        await asyncio.sleep(0.01)
        status = 503 if len(seen) % 5 == 0 else 200
        return web.json_response({"results": [{"index": i} for i in range(len(body["documents"]))]}, status=status)

    async def main(records: list, bounds: list) -> None:
        async with rerank_server(handler) as url:
            await stepload.run_load(url, [(2, 0.3), (0, 0.2), (4, 0.3)], Fresh(), records, time.monotonic(), bounds)

    records, bounds = [], []
    asyncio.run(main(records, bounds))
    assert len(records) == len(seen) and len(set(seen)) == len(seen)  # every request fresh, every one recorded
    assert {r["step"] for r in records} == {0, 2}  # the idle step sent nothing
    assert all(r["pairs"] == 2 and r["end"] > r["start"] for r in records)
    assert sorted({r["status"] for r in records}) == [200, 503]
    assert sum(r["step"] == 2 for r in records) > sum(r["step"] == 0 for r in records)  # 4 workers against 2
    assert len(bounds) == 3 and bounds[1][1] - bounds[1][0] >= 0.19
