"""Helpers of the batch tests. The session fixtures (`ray_cluster`, `tiny_text`, `tiny_vl`, `service`) come
from tests/conftest.py; nothing here starts Ray."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

WORDS = (
    "protein calorie mountain summit river ocean forest cloud energy battery solar wind engine rocket orbit "
    "planet galaxy neuron memory language grammar token vector matrix kernel compiler network packet router "
    "server cluster replica batch budget padding ranking retrieval passage query document relevance score"
).split()


def make_pairs(n_queries: int, docs_per_query: int, seed: int = 0) -> list[dict]:
    """Short synthetic pairs, one row each, queries interleaved (a query's rows spread over batches)."""
    rng = random.Random(seed)
    queries = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + f" q{i}" for i in range(n_queries)]
    rows = []
    for j in range(docs_per_query):
        for i, q in enumerate(queries):
            doc = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))
            rows.append({"query_id": f"q{i}", "query": q, "document": doc, "doc_id": f"q{i}-d{j}"})
    for pos, r in enumerate(rows):
        r["position"] = pos
    return rows


def png_bytes(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def vl_local(tiny_vl):
    from rerank_core import load_reranker

    return load_reranker(tiny_vl, device="cpu")
