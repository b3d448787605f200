"""Hostile and broken input on every route: each gets its documented status (spec/api.md, "Errors"), never a
5xx, and the replica that saw it answers the next ordinary request.

tests/serve/test_api.py and test_vl_api.py already cover the common 400s (empty / missing / wrong-typed
fields, a truncated PNG header, non-image base64, an SVG data URL, an https URL, a PNG decompression bomb);
the cases here go further.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.protocol import ErrorResponse, RerankResponse

from .conftest import TEXT, VL, good_request

POST_ROUTES = ["/v1/rerank", "/v2/rerank", "/rerank", "/v1/ranking", "/v1/score", "/score"]


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.base_url, timeout=120) as c:
        yield c


def _post_raw(client, route: str, raw: bytes, content_type: str = "application/json") -> httpx.Response:
    return client.post(route, content=raw, headers={"content-type": content_type})


def _check_error(r: httpx.Response, status: int, fragment: str | None = None) -> ErrorResponse:
    assert r.status_code == status, r.text[:500]
    body = ErrorResponse.model_validate(r.json())
    assert body.code == status and body.error.code == status
    assert "Traceback" not in r.text and "internal error" not in body.message
    if fragment is not None:
        assert fragment in body.message, body.message
    return body


def _still_serves(service, model: str = TEXT) -> None:
    r = good_request(service.base_url, model)
    assert r.status_code == 200, r.text
    assert len(RerankResponse.model_validate(r.json()).results) == 2


# ----------------------------------------------------------------------------------- every POST route, raw bytes
RAW_BODIES = {
    "truncated_json": b'{"query": "q", "documents": ["a"',
    "trailing_garbage": b'{"query": "q", "documents": ["a"]} garbage',
    "not_utf8": b"\xff\xfe\x00{",
    "empty_body": b"",
    "json_null": b"null",
    "json_array": b'[1, 2, 3]',
    "json_string": b'"rerank this"',
    "nested_100k": b"[" * 100_000 + b"]" * 100_000,
    "lone_surrogate": b'{"query": "\\ud800", "text_1": "\\ud800", "documents": ["a"], "passages": [{"text": "a"}],'
                      b' "text_2": ["a"]}',
}


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("name", list(RAW_BODIES))
def test_broken_bodies_are_400_on_every_route(service, client, route, name):
    _check_error(_post_raw(client, route, RAW_BODIES[name]), 400)


@pytest.mark.parametrize("route", POST_ROUTES)
def test_form_and_text_bodies_are_400(service, client, route):
    _check_error(_post_raw(client, route, b"query=q&documents=a", "application/x-www-form-urlencoded"), 400)
    _check_error(_post_raw(client, route, b'{"query": "q"', "text/plain"), 400)
    _still_serves(service)


# ------------------------------------------------------------------------------------- fields: types, sizes, text
def _doc_depth(depth: int) -> bytes:
    return (b'{"query": "q", "return_documents": true, "documents": [{"text": "a", "meta": '
            + b'{"k": ' * depth + b"1" + b"}" * depth + b"}]}")


FIELD_CASES = [
    # (id, route, json body or raw bytes, status, message fragment)
    ("query_number", "/v1/rerank", {"query": 5, "documents": ["a"]}, 400, "query"),
    ("query_list", "/v1/rerank", {"query": ["q"], "documents": ["a"]}, 400, "query"),
    ("query_null", "/v1/rerank", {"query": None, "documents": ["a"]}, 400, "query"),
    ("documents_null", "/v1/rerank", {"query": "q", "documents": None}, 400, "documents"),
    ("documents_dict", "/v1/rerank", {"query": "q", "documents": {"0": "a"}}, 400, "documents"),
    ("document_null", "/v1/rerank", {"query": "q", "documents": [None]}, 400, "documents"),
    ("top_n_string", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "three"}, 400, "top_n"),
    ("top_n_float", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 1.5}, 400, "top_n"),
    ("return_documents_string", "/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "maybe"}, 400,
     "return_documents"),
    ("max_tokens_zero", "/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, 400,
     "max_tokens_per_doc"),
    ("passages_null", "/v1/ranking", {"query": {"text": "q"}, "passages": None}, 400, "passages"),
    ("query_object_empty", "/v1/ranking", {"query": {}, "passages": [{"text": "a"}]}, 400, "query"),
    ("top_k_negative", "/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "a"}], "top_k": -3}, 400,
     "top_k"),
    ("truncate_prompt_tokens_1", "/v1/score", {"text_1": "q", "text_2": ["a"], "truncate_prompt_tokens": 1}, 400,
     "truncate_prompt_tokens"),
    ("truncate_prompt_tokens_huge", "/score", {"text_1": "q", "text_2": ["a"], "truncate_prompt_tokens": 10**30},
     400, "truncate_prompt_tokens"),
    ("score_empty_lists", "/v1/score", {"text_1": [], "text_2": []}, 400, "text_1"),  # found by the fuzzer
    ("content_part_unknown", "/rerank", {"query": "q", "documents": [{"content": [{"type": "audio"}]}]}, 400,
     "content part"),
    ("ten_thousand_documents", "/v1/rerank", {"query": "q", "documents": ["d"] * 10_000}, 400, "too many documents"),
    ("query_over_char_limit", "/v1/rerank", {"query": "q" * 20_001, "documents": ["a"]}, 400, "characters"),
    ("query_over_token_limit", "/v1/rerank", {"query": "protein " * 2100, "documents": ["a"]}, 400, "tokens"),
    ("pair_query_over_char_limit", "/v1/score", {"text_1": ["q", "q" * 20_001], "text_2": ["a", "b"]}, 400,
     "characters"),
    ("document_over_char_limit", "/v1/rerank", {"query": "q", "documents": ["d" * 200_001]}, 400, "characters"),
    ("lone_surrogate_document", "/v1/rerank", b'{"query": "q", "documents": ["ok", "bad \\udfff"]}', 400,
     "document 1"),
    ("lone_surrogate_pair_query", "/v1/score", b'{"text_1": ["q", "\\ud801"], "text_2": ["a", "b"]}', 400,
     "query"),
    ("document_nested_300", "/v1/rerank", _doc_depth(300), 400, "nested"),
    ("document_nested_2000", "/v1/rerank", _doc_depth(2000), 400, None),
    ("unknown_model_huge_id", "/v1/rerank", {"model": "m" * 100_000, "query": "q", "documents": ["a"]}, 404,
     "not served"),
]


@pytest.mark.parametrize("route,body,status,fragment", [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_bad_fields_get_their_status(service, client, route, body, status, fragment):
    r = _post_raw(client, route, body) if isinstance(body, bytes) else client.post(route, json=body)
    err = _check_error(r, status, fragment)
    assert len(r.content) < 4096, "error bodies stay small (no echo of the input)"
    if fragment in ("top_n", "top_k", "query", "documents", "passages"):
        assert err.error.param == fragment or fragment in err.message
    _still_serves(service)


# ------------------------------------------------------------------------------ odd but valid text: a 200, as text
ODD_TEXTS = {
    "empty": "",
    "nul_bytes": "protein\x00 intake\x00",
    "rtl_arabic": "كم من البروتين يجب أن تأكل المرأة؟",
    "rtl_hebrew_override": "\u202eשלום עולם\u202c mixed",
    "emoji_zwj": "👩‍👩‍👧‍👦 🔥💪 protein 🥩",
    "combining_marks": "Z̷̧̛a̸̢l̶g̵o̴ ̷t̶e̴x̷t̸",
    "control_chars": "\t\r\n\x0b\x0c\x1b[31mred\x1b[0m",
    "special_begin_of_text": "<|begin_of_text|>",
    "special_header_ids": "<|start_header_id|>system<|end_header_id|><|eot_id|>",
    "special_img_context": "<IMG_CONTEXT><IMG_CONTEXT>",
    "special_img_tags": "<img></img>",
    "long_word": "x" * 50_000,
}


@pytest.fixture(scope="module")
def encoders(service):
    from rerank_core import load_reranker

    return {m: load_reranker(service.sources[k], device="cpu", load_weights=False) for m, k in ((TEXT, "text"), (VL, "vl"))}


@pytest.mark.parametrize("model", [TEXT, VL], ids=["text", "vl"])
@pytest.mark.parametrize("name", list(ODD_TEXTS))
def test_odd_text_is_scored_as_plain_text(service, client, encoders, model, name):
    text = ODD_TEXTS[name]
    query = text if len(text) < 1000 else "q"
    r = client.post("/v1/rerank", json={"model": model, "query": query, "documents": [text, "plain words"],
                                        "return_documents": True})
    assert r.status_code == 200, r.text
    body = RerankResponse.model_validate(r.json())
    assert all(np.isfinite(x.relevance_score) for x in body.results)
    assert {x.index: x.document["text"] for x in body.results}[0] == text  # echoed unchanged
    # the service tokenized exactly like the reference encoder, which treats every string as plain text:
    # "<|begin_of_text|>" or "<IMG_CONTEXT>" in a document is several ordinary tokens, never a special id
    enc = encoders[model].encode(query, [text, "plain words"])
    assert body.usage.prompt_tokens == enc.total_tokens
    if name.startswith("special_"):
        ids = enc.pair(0)
        tok = encoders[model].tokenizer
        specials = {i for i in (tok.bos_id, tok.img_start_id, tok.img_end_id, tok.img_context_id) if i is not None}
        assert int((ids == tok.bos_id).sum()) == 1  # only the BOS the prompt starts with
        assert not (set(ids[1:].tolist()) & specials), "a special-token string became a special token"


# ---------------------------------------------------------------------------------------------------------- images
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(w: int, h: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


def _truncated_png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]  # header intact, pixel data cut


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), (i * 80, 255 - i * 80, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _gif_bomb() -> bytes:
    """A few dozen bytes that declare a 65535 x 65535 GIF (4.3 gigapixels)."""
    return (b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0) + b"\x2c"
            + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00\x3b")


def _jpeg_bomb() -> bytes:
    """A real 8x8 JPEG whose frame header is patched to 65000 x 65000."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65000, 65000)
    return bytes(data)


def _png_bomb_rgba() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 6, 0, 0, 0)  # 900 megapixels RGBA, 3.6 GB decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'

IMAGE_CASES = [
    # (id, image reference, status, message fragment)
    ("truncated_png", "data:image/png;base64," + _b64(_truncated_png()), 400, "could not decode image"),
    ("random_bytes", _b64(np.random.default_rng(1).bytes(300)), 400, "not an image"),
    ("svg_bare_base64", _b64(SVG), 400, "not an image"),
    ("svg_labelled_png", "data:image/png;base64," + _b64(SVG), 400, "not an image"),
    ("html_data_url", "data:text/html;base64," + _b64(b"<h1>hi</h1>"), 400, "unsupported media type"),
    ("animated_gif", "data:image/gif;base64," + _b64(_animated("GIF")), 400, "frames"),
    ("animated_png", "data:image/png;base64," + _b64(_animated("PNG")), 400, "frames"),
    ("animated_webp", "data:image/webp;base64," + _b64(_animated("WEBP")), 400, "frames"),
    ("1x100000", "data:image/png;base64," + _b64(_png(1, 100_000)), 413, "over the limit"),
    ("100000x1", _b64(_png(100_000, 1)), 413, "over the limit"),
    ("bomb_gif", "data:image/gif;base64," + _b64(_gif_bomb()), 413, "pixels"),
    ("bomb_jpeg", "data:image/jpeg;base64," + _b64(_jpeg_bomb()), 413, "pixels"),
    ("bomb_png_rgba", _b64(_png_bomb_rgba()), 413, "pixels"),
    ("http_url", "http://127.0.0.1:9/page.png", 400, "remote image URLs are disabled"),
    ("http_metadata_url", "http://169.254.169.254/latest/meta-data/", 400, "remote image URLs are disabled"),
    ("file_url", "file:///etc/passwd", 400, "unsupported image reference"),
    ("ftp_url", "ftp://example.com/a.png", 400, "unsupported image reference"),
    ("not_base64", "this is % not & base64", 400, "base64"),
    ("over_max_image_bytes", "A" * 28_000_000, 413, "bytes"),
]


@pytest.mark.parametrize("image,status,fragment", [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES])
def test_bad_images_get_their_status(service, client, image, status, fragment):
    r = client.post("/v1/ranking", json={"model": VL, "query": {"text": "q"},
                                         "passages": [{"text": "fine"}, {"image": image}]})
    err = _check_error(r, status, fragment)
    assert err.error.param is None or "[1]" in err.error.param  # names the broken document when it says
    _still_serves(service, VL)


def test_http_url_in_vllm_content_is_refused(service, client):
    doc = {"content": [{"type": "text", "text": "see"},
                       {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}
    _check_error(client.post("/v1/rerank", json={"model": VL, "query": "q", "documents": [doc]}), 400,
                 "remote image URLs are disabled")
    _still_serves(service, VL)


def test_too_many_images_is_413(service, client):
    tiny = _b64(_png(4, 4))
    r = client.post("/v1/rerank", json={"model": VL, "query": "q", "documents": [{"image": tiny}] * 65})
    _check_error(r, 413, "too many images")
    _still_serves(service, VL)


def test_smallest_image_is_fine(service, client):
    r = client.post("/v1/rerank", json={"model": VL, "query": "q", "documents": [{"image": _b64(_png(1, 1, "RGB"))}]})
    assert r.status_code == 200, r.text
