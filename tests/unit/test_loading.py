"""Strict checkpoint loading and clear failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from rerank_core import CheckpointError, WeightsNotFound, load_reranker
from rerank_core.checkpoint import resolve_source


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(path: str, edit) -> None:
    sd = load_file(os.path.join(path, "model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(path, "model.safetensors"))


def test_published_key_names(tiny_text):
    sd = load_file(os.path.join(tiny_text, "model.safetensors"))
    assert "model.embed_tokens.weight" in sd and "model.norm.weight" in sd and "score.weight" in sd
    assert "model.layers.1.self_attn.q_proj.weight" in sd and "model.layers.0.mlp.down_proj.weight" in sd
    assert not any(k.startswith("lm_head") or "rotary" in k for k in sd)
    r = load_reranker(tiny_text, device="cpu")
    assert set(r.model.state_dict()) == set(sd)


def test_missing_tensor(tiny_text, tmp_path):
    p = _copy(tiny_text, tmp_path / "ck")
    _rewrite(p, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_reranker(p, device="cpu")


def test_unexpected_tensor(tiny_text, tmp_path):
    p = _copy(tiny_text, tmp_path / "ck")
    _rewrite(p, lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: lm_head\.weight"):
        load_reranker(p, device="cpu")


def test_misshaped_tensor(tiny_text, tmp_path):
    p = _copy(tiny_text, tmp_path / "ck")
    _rewrite(p, lambda sd: sd.__setitem__("score.weight", torch.zeros(2, 64)))
    with pytest.raises(CheckpointError, match=r"score\.weight: checkpoint \[2, 64\] vs model \[1, 64\]"):
        load_reranker(p, device="cpu")


def test_sharded_index_loads_the_same(tiny_text, tmp_path):
    p = _copy(tiny_text, tmp_path / "ck")
    sd = load_file(os.path.join(p, "model.safetensors"))
    os.remove(os.path.join(p, "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, os.path.join(p, name))
        weight_map.update({k: name for k in ks})
    with open(os.path.join(p, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    a = load_reranker(p, device="cpu").score("q", ["a", "b c"])
    b = load_reranker(tiny_text, device="cpu").score("q", ["a", "b c"])
    assert a == pytest.approx(b, abs=1e-6)


def test_bf16_stored_weights_load_in_float32(tiny_text, tmp_path):
    p = _copy(tiny_text, tmp_path / "ck")
    _rewrite(p, lambda sd: sd.update({k: v.to(torch.bfloat16) for k, v in sd.items()}))
    r = load_reranker(p, device="cpu")
    assert r.model.model.embed_tokens.weight.dtype == torch.float32
    assert len(r.score("q", ["p"])) == 1


def test_no_weights_file(tiny_text, tmp_path):
    p = _copy(tiny_text, tmp_path / "ck")
    os.remove(os.path.join(p, "model.safetensors"))
    with pytest.raises(WeightsNotFound, match="neither model.safetensors nor"):
        load_reranker(p, device="cpu")


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(WeightsNotFound, match="not a directory"):
        resolve_source(str(tmp_path / "nope" / "deeper"))


def test_hub_id_offline_fails_fast_with_guidance(tmp_path):
    """No network, no cache: the error names the model, what was tried, and how to use a local copy."""
    code = (
        "import time; from rerank_core.checkpoint import resolve_source\n"
        "t=time.time()\n"
        "try:\n    resolve_source('nvidia/llama-nemotron-rerank-1b-v2')\n"
        "except Exception as e:\n    print(type(e).__name__, '|', e, '|', round(time.time()-t, 1))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 60
    assert out.stdout.startswith("WeightsNotFound"), out.stdout + out.stderr
    msg = out.stdout
    assert "nvidia/llama-nemotron-rerank-1b-v2" in msg
    assert "local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "--local-dir" in msg and "source" in msg


def test_unsupported_model_type(tiny_text, tmp_path):
    p = _copy(tiny_text, tmp_path / "ck")
    cfg = json.load(open(os.path.join(p, "config.json")))
    cfg["model_type"] = "bert"
    json.dump(cfg, open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        load_reranker(p, device="cpu")
