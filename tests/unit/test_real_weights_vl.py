"""Tier that runs only where the real VL weights are present.

Set RERANK_VL_CHECKPOINT to a local copy of nvidia/llama-nemotron-rerank-vl-1b-v2. Optionally set
RERANK_VL_CARD_IMAGES to a directory holding the model card's three images (file names as in their URLs)
to also check the image-only and image+text values.

The query, documents and logits are the model card's Sentence-Transformers example (CrossEncoder,
default settings, bf16 weights). The card's logits are bf16-rounded and come from a bf16 head; ours keeps
the head and pooling in float32, so they are compared with a bf16-sized tolerance.
"""

from __future__ import annotations

import os

import pytest

CKPT = os.environ.get("RERANK_VL_CHECKPOINT")
CARD_IMAGES = os.environ.get("RERANK_VL_CARD_IMAGES")

QUERY = "How is AI improving the intelligence and capabilities of robots?"
DOCUMENTS = [
    "AI enables robots to perceive, plan, and act autonomously.",
    "AI is transforming autonomous vehicles by enabling safer, smarter, and more reliable decision-making on the road.",
    "A biological foundation model designed to analyze and generate DNA, RNA, and protein sequences.",
]
IMAGE_FILES = [
    "nvidia-isaac-lab-1920x1080.jpg",
    "automotive-key-visual-corp-blog-level4-av-og-1280x680-1.png",
    "hc-press-evo2-nim-25-featured-b.jpg",
]
TEXT_LOGITS = [-0.738, -3.859, -7.75]
IMAGE_LOGITS = [-4.125, -5.156, -5.969]
IMAGE_TEXT_LOGITS = [-2.594, -4.531, -6.219]
TOL = 0.1

needs_weights = pytest.mark.skipif(
    not CKPT, reason="RERANK_VL_CHECKPOINT is not set: the real VL weights are not on this machine"
)


@pytest.fixture(scope="module")
def reranker():
    from rerank_core import load_reranker

    return load_reranker(CKPT, dtype="bfloat16")


@needs_weights
def test_model_card_text_only_logits_bf16(reranker):
    assert reranker.kind == "vl"
    logits = reranker.score(QUERY, DOCUMENTS)
    for got, want in zip(logits, TEXT_LOGITS):
        assert got == pytest.approx(want, abs=TOL)
    assert logits[0] > logits[1] > logits[2]


@needs_weights
@pytest.mark.skipif(not CARD_IMAGES, reason="RERANK_VL_CARD_IMAGES is not set: the model card's images are not here")
def test_model_card_image_logits_bf16(reranker):
    paths = [os.path.join(CARD_IMAGES, name) for name in IMAGE_FILES]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        pytest.skip(f"card images missing: {missing}")
    image_only = reranker.score(QUERY, [{"image": p} for p in paths])
    both = reranker.score(QUERY, [{"image": p, "text": t} for p, t in zip(paths, DOCUMENTS)])
    for got, want in zip(image_only + both, IMAGE_LOGITS + IMAGE_TEXT_LOGITS):
        assert got == pytest.approx(want, abs=2 * TOL)
