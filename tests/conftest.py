"""Shared fixtures: tiny checkpoints in the published layouts, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RERANK_SHARED_DIR", REPO.parent / "shared"))
LLAMA3_TOKENIZER = SHARED / "tokenizers" / "llama3"
LLAMA3_VL_TOKENIZER = SHARED / "tokenizers" / "llama3-vl"


def _need(path: Path) -> str:
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"the real Llama 3 tokenizer is not at {path} (set RERANK_SHARED_DIR to the shared folder)")
    return str(path)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> str:
    return _need(LLAMA3_TOKENIZER)


@pytest.fixture(scope="session")
def llama3_vl_tokenizer_dir() -> str:
    return _need(LLAMA3_VL_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory, llama3_tokenizer_dir) -> str:
    """Tiny text reranker with the real tokenizer (float32 weights)."""
    from rerank_core.tiny import make_tiny

    return make_tiny("text", str(tmp_path_factory.mktemp("tiny-text")), tokenizer=llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_text_small_tok(tmp_path_factory) -> str:
    """Tiny text reranker with the self-built tokenizer (no shared files needed)."""
    from rerank_core.tiny import make_tiny

    return make_tiny("text", str(tmp_path_factory.mktemp("tiny-text-small")))


@pytest.fixture(scope="session")
def text_reranker(tiny_text):
    from rerank_core import load_reranker

    return load_reranker(tiny_text, device="cpu")


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory, llama3_vl_tokenizer_dir) -> str:
    """Tiny VL reranker (published layout, tiny SigLIP and Llama) with the real VL tokenizer, float32."""
    from rerank_core.tiny import make_tiny

    return make_tiny("vl", str(tmp_path_factory.mktemp("tiny-vl")), tokenizer=llama3_vl_tokenizer_dir)
