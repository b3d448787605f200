"""The command line as the README uses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rerank_core import load_reranker


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rerank_core", *args], capture_output=True, text=True, timeout=300)


def test_make_tiny_then_score_without_shared_files(tmp_path):
    out = tmp_path / "tiny"
    r = _run("make-tiny", "--kind", "text", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama_bidirec" and cfg["architectures"] == ["LlamaBidirectionalForSequenceClassification"]
    r = _run("score", "--model", str(out), "--query", "how much protein", "--doc", "46 grams", "--doc", "a summit")
    assert r.returncode == 0, r.stderr
    logits = json.loads(r.stdout)["logits"]
    expected = load_reranker(str(out), device="cpu").score("how much protein", ["46 grams", "a summit"])
    assert logits == expected


def test_rerank_command_and_clear_error(tiny_text, tmp_path):
    r = _run("rerank", "--model", tiny_text, "--query", "q", "--doc", "a", "--doc", "b", "--doc", "c", "--top-n", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"]
    assert len(res) == 2 and res[0]["logit"] >= res[1]["logit"]
    r = _run("score", "--model", str(tmp_path / "missing" / "dir"), "--query", "q", "--doc", "a")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert os.path.exists(tiny_text)
