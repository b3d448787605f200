"""benchmarks/compare.py's ratio table: per-round ratios against vLLM and the ceiling, and their medians."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import compare  # noqa: E402


def _round(service: list[tuple[int, float, float]], vllm: list[tuple[int, float, float]] | None = None) -> dict:
    def results(rows):
        return {"results": [{"concurrency": c, "pairs_per_s": p, "p99_s": q} for c, p, q in rows]}

    rnd = {"service": results(service)}
    if vllm is not None:
        rnd["vllm"] = results(vllm)
    return rnd


def test_even_rounds_take_the_mean_of_the_middle_two_as_median():
    rounds = [_round([(1, 13.0, 0.10), (4, 20.0, 0.30)], [(1, 10.0, 0.10), (4, 20.0, 0.40)]),
              _round([(1, 11.0, 0.12), (4, 18.0, 0.30)], [(1, 10.0, 0.15), (4, 20.0, 0.30)])]
    table = compare.ratio_table(rounds)
    one = table["1"]
    assert one["service_pairs_per_s"] == [13.0, 11.0] and one["vllm_pairs_per_s"] == [10.0, 10.0]
    assert one["service_over_vllm"] == [1.3, 1.1]
    assert one["service_over_vllm_median"] == 1.2  # not the upper of the two
    assert one["p99_service_over_vllm"] == [1.0, 0.8] and one["p99_service_over_vllm_median"] == 0.9
    assert table["4"]["service_over_vllm_median"] == 0.95
    assert table["4"]["p99_service_over_vllm_median"] == 0.875
    assert "service_over_ceiling" not in one


def test_odd_rounds_ceiling_and_service_only_rounds():
    rounds = [_round([(16, 30.0, 9.0)], [(16, 25.0, 9.0)]), _round([(16, 24.0, 9.0)], [(16, 30.0, 9.0)]),
              _round([(16, 27.0, 9.0)], [(16, 27.0, 9.0)])]
    row = compare.ratio_table(rounds, {"pairs_per_s": 30.0})["16"]
    assert row["service_over_vllm"] == [1.2, 0.8, 1.0] and row["service_over_vllm_median"] == 1.0
    assert row["service_over_ceiling"] == [1.0, 0.8, 0.9] and row["service_over_ceiling_median"] == 0.9
    alone = compare.ratio_table([_round([(2, 5.0, 1.0)])])["2"]
    assert alone == {"service_pairs_per_s": [5.0], "service_p99_s": [1.0]}


def test_steady_throughput_ratios_when_both_sides_report_them():
    rounds = [_round([(16, 30.0, 9.0)], [(16, 25.0, 9.0)]), _round([(16, 24.0, 9.0)], [(16, 30.0, 9.0)])]
    for rnd, (svc, vllm) in zip(rounds, [(33.0, 30.0), (27.0, 30.0)]):
        rnd["service"]["results"][0]["steady_pairs_per_s"] = svc
        rnd["vllm"]["results"][0]["steady_pairs_per_s"] = vllm
    row = compare.ratio_table(rounds)["16"]
    assert row["service_steady_pairs_per_s"] == [33.0, 27.0] and row["vllm_steady_pairs_per_s"] == [30.0, 30.0]
    assert row["steady_service_over_vllm"] == [1.1, 0.9] and row["steady_service_over_vllm_median"] == 1.0
    assert row["service_over_vllm"] == [1.2, 0.8]  # the whole-run ratio is kept beside it


def test_service_config_applies_scorer_overrides_and_validates(tmp_path):
    """--scorer k=v,... reaches the text scorer of the benchmark's serve config, which the app accepts."""
    import yaml

    from deployments.config import AppArgs

    assert compare.parse_overrides("cpu_forward_tokens=2048,batch_queue=serve") == {
        "cpu_forward_tokens": 2048, "batch_queue": "serve"}
    out = compare.service_config(tmp_path / "ckpt", 18999, 2, tmp_path / "c.yaml",
                                 scorer=compare.parse_overrides("cpu_forward_tokens=2048"))
    (model,) = AppArgs.model_validate(yaml.safe_load(out.read_text())["applications"][0]["args"]).models
    assert model.scorer.cpu_forward_tokens == 2048 and model.scorer.torch_threads == 2
    plain = compare.service_config(tmp_path / "ckpt", 18999, 2, tmp_path / "d.yaml")
    (model,) = AppArgs.model_validate(yaml.safe_load(plain.read_text())["applications"][0]["args"]).models
    assert model.scorer.cpu_forward_tokens != 2048
    assert model.tokenize_in_ingress is None
    # --model k=v,... sets the model's own fields
    off = compare.service_config(tmp_path / "ckpt", 18999, 2, tmp_path / "e.yaml",
                                 model=compare.parse_overrides("tokenize_in_ingress=false"))
    (model,) = AppArgs.model_validate(yaml.safe_load(off.read_text())["applications"][0]["args"]).models
    assert model.tokenize_in_ingress is False


def test_ceiling_runs_with_the_scorers_threads_per_pass_and_pass_size(tmp_path, monkeypatch):
    """--scorer cpu_threads_per_pass / cpu_forward_tokens / cpu_thread_tokens / compile change the ceiling's
    passes as they do the scorer's."""
    import argparse
    import types

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return types.SimpleNamespace(stdout='log line\n{"pairs": 1}')

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    args = argparse.Namespace(tokenizer="tok", docs=8, doc_tokens="32,256", query_words=40, threads=2,
                              ceiling_requests=4)
    assert compare.run_ceiling(tmp_path, args) == {"pairs": 1}
    assert calls[0][calls[0].index("--query-words") + 1] == "40"  # the ceiling's queries are the cell's
    assert "--threads-per-pass" not in calls[0] and "--max-batch-tokens" not in calls[0]
    assert "--compile" not in calls[0]
    compare.run_ceiling(tmp_path, args, {"cpu_threads_per_pass": 2, "cpu_forward_tokens": 2048, "compile": True})
    cmd = calls[1]
    assert cmd[cmd.index("--threads-per-pass") + 1] == "2" and cmd[cmd.index("--max-batch-tokens") + 1] == "2048"
    assert "--compile" in cmd
    assert cmd[cmd.index("--threads") + 1] == "2"
    # the scorer's passes are its threads' shares: the smaller of cpu_forward_tokens and cpu_thread_tokens
    for overrides, want in [({"cpu_thread_tokens": 4096}, "4096"), ({"cpu_forward_tokens": 1024}, "1024"),
                            ({"cpu_forward_tokens": 8192, "cpu_thread_tokens": 3000}, "3000")]:
        compare.run_ceiling(tmp_path, args, overrides)
        assert calls[-1][calls[-1].index("--max-batch-tokens") + 1] == want, overrides
