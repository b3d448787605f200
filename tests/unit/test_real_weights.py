"""Tier that runs only where the real weights are present.

Set RERANK_TEXT_CHECKPOINT to a local copy of nvidia/llama-nemotron-rerank-1b-v2.
"""

from __future__ import annotations

import os

import pytest

from rerank_core import load_reranker

CKPT = os.environ.get("RERANK_TEXT_CHECKPOINT")

QUERY = "how much protein should a female eat?"
DOCUMENTS = [
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day. "
    "But, as you can see from this chart, you'll need to increase that if you're expecting or training for a "
    "marathon. Check out the chart below to see how much protein you should be eating each day.",
    "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a "
    "mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or more "
    "governments.",
    "Calorie intake should not fall below 1,200 a day in women or 1,500 a day in men, except under the supervision "
    "of a health professional.",
]
CARD_LOGITS = [20.625, -23.125, -0.2617]


@pytest.mark.skipif(not CKPT, reason="RERANK_TEXT_CHECKPOINT is not set: the real text weights are not on this machine")
def test_model_card_logits_bf16():
    r = load_reranker(CKPT, dtype="bfloat16")
    logits = r.score(QUERY, DOCUMENTS, max_length=512)
    for got, want in zip(logits, CARD_LOGITS):
        assert got == pytest.approx(want, abs=max(0.15, abs(want) * 0.02))
    assert logits[0] > logits[2] > logits[1]
