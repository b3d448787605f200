"""Image documents through every dialect, against the VL model of serve_config.yaml (tiny weights)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from deployments.protocol import ErrorResponse, RankingResponse, RerankResponse, ScoreResponse
from rerank_core import load_reranker, sigmoid

VL = "nvidia/llama-nemotron-rerank-vl-1b-v2"
QUERY = "which chart shows revenue growth?"


def _data_url(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    rng = np.random.default_rng(3)
    wide = Image.fromarray(rng.integers(0, 255, (300, 900, 3), dtype=np.uint8))
    page = Image.fromarray(rng.integers(0, 255, (660, 510, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (128, 128, 4), dtype=np.uint8), "RGBA")
    return {
        "wide_png": _data_url(wide, "PNG"),
        "page_jpeg": _data_url(page, "JPEG"),
        "rgba_png": _data_url(rgba, "PNG"),
        "bare_b64_png": _data_url(wide, "PNG").split(",", 1)[1],
    }


@pytest.fixture(scope="module")
def local(service):
    return load_reranker(service.sources["vl"], device="cpu")


def _docs(images):
    return [
        {"text": "Quarterly revenue grew 12 percent."},
        {"image": images["wide_png"]},
        {"text": "", "image": images["page_jpeg"]},
        {"text": "A pie chart of costs.", "image": images["rgba_png"]},
        {"image": images["bare_b64_png"]},
    ]


@pytest.fixture(scope="module")
def expected(local, images):
    return np.array(local.score(QUERY, _docs(images)), dtype=np.float32)


def test_nim_ranking_with_images(service, images, expected):
    r = service.client.post("/v1/ranking", json={"model": VL, "query": {"text": QUERY}, "passages": _docs(images)})
    assert r.status_code == 200, r.text
    body = RankingResponse.model_validate(r.json())
    # documents 1 and 4 carry the same image: their logits tie up to float noise, so either may come first
    logits = [x.logit for x in body.rankings]
    assert logits == sorted(logits, reverse=True)
    assert sorted(x.index for x in body.rankings) == list(range(len(expected)))
    got = {x.index: x.logit for x in body.rankings}
    np.testing.assert_allclose([got[i] for i in range(len(expected))], expected, atol=1e-4)
    # usage counts the image tokens: at least 258 per image document
    assert body.usage.prompt_tokens > 4 * 258


def test_jina_and_vllm_shapes(service, images, expected):
    docs = _docs(images)
    vllm_docs = []
    for d in docs:
        parts = []
        if d.get("text"):
            parts.append({"type": "text", "text": d["text"]})
        if d.get("image"):
            parts.append({"type": "image_url", "image_url": {"url": d["image"]}})
        vllm_docs.append({"content": parts})
    for payload_docs in (docs, vllm_docs):
        r = service.client.post("/v1/rerank", json={"model": VL, "query": QUERY, "documents": payload_docs,
                                                    "raw_scores": True})
        assert r.status_code == 200, r.text
        got = {x.index: x.relevance_score for x in RerankResponse.model_validate(r.json()).results}
        np.testing.assert_allclose([got[i] for i in range(len(expected))], expected, atol=1e-4)


def test_vl_score_route_and_text_only(service, local):
    texts = ["revenue grew", "a mountain"]
    r = service.client.post("/v1/score", json={"model": VL, "text_1": QUERY, "text_2": texts})
    got = [d.score for d in ScoreResponse.model_validate(r.json()).data]
    np.testing.assert_allclose(got, sigmoid(local.score(QUERY, texts)), atol=1e-5)


def test_images_batched_with_other_requests_keep_their_scores(service, images, expected):
    """Documents spread over chunks and batches: each score equals the in-process one."""
    docs = _docs(images) * 4
    r = service.client.post("/v1/ranking", json={"model": VL, "query": {"text": QUERY}, "passages": docs})
    got = {x.index: x.logit for x in RankingResponse.model_validate(r.json()).rankings}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], np.tile(expected, 4), atol=1e-4)


@pytest.mark.parametrize(
    "image,status,fragment",
    [
        ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA", 400, "decode"),
        ("bm90IGFuIGltYWdlIGF0IGFsbA==", 400, "not an image"),
        ("data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", 400, "unsupported media type"),
        ("https://example.com/page.png", 400, "remote image URLs are disabled"),
    ],
)
def test_broken_images_are_clear_errors(service, image, status, fragment):
    r = service.client.post("/v1/ranking", json={"model": VL, "query": {"text": "q"}, "passages": [{"image": image}]})
    assert r.status_code == status, r.text
    assert fragment in ErrorResponse.model_validate(r.json()).message
    # the service keeps serving
    ok = service.client.post("/v1/ranking", json={"model": VL, "query": {"text": "q"}, "passages": [{"text": "t"}]})
    assert ok.status_code == 200


def test_decompression_bomb_is_413(service):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)  # 2.5 gigapixel grayscale header
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    r = service.client.post("/v1/rerank", json={"model": VL, "query": "q", "documents": [{"image": url}]})
    assert r.status_code == 413, r.text


def test_image_query_is_400(service, images):
    r = service.client.post("/v1/ranking", json={"model": VL, "query": {"image": images["wide_png"]},
                                                 "passages": [{"text": "t"}]})
    assert r.status_code == 400


def test_langchain_nvidia_rerank_with_image_metadata(service, images, expected):
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    docs = [Document(page_content=d.get("text") or "", metadata=({"image": d["image"]} if "image" in d else {}))
            for d in _docs(images)[:4]]
    reranker = NVIDIARerank(base_url=service.base_url + "/v1", model=VL, api_key="anything", top_n=4)
    out = reranker.compress_documents(docs, QUERY)
    want = expected[:4]
    assert [round(o.metadata["relevance_score"], 3) for o in out] == [round(float(x), 3) for x in np.sort(want)[::-1]]
