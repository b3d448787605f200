"""Numerical and behavioural evidence for the VL reranker on a tiny checkpoint in the published layout.

Parity is against ``tests/reference_vl.py`` (transformers' SigLIP and Llama layers, independent
preprocessing and tokenization), float32 on CPU.
"""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rerank_core import load_reranker
from rerank_core.errors import CheckpointError, InputTooLong, InvalidInput, PayloadTooLarge
from rerank_core.imaging import ImageLimits

QUERY = "How is AI improving the intelligence and capabilities of robots?"
TEXTS = [
    "AI enables robots to perceive, plan, and act autonomously.",
    "AI is transforming autonomous vehicles by enabling safer, smarter, and more reliable decision-making on the road.",
    "A biological foundation model designed to analyze and generate DNA, RNA, and protein sequences.",
]
LONG = " ".join(TEXTS) * 12
PARITY_ATOL = 1e-5  # measured <= 1.1e-6; a projector LayerNorm eps of 1e-6 instead of 1e-5 moves logits 1.4e-5
SPECIAL_START = 128256  # first added special token of the VL vocabulary (<img>)


def synthetic(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients + blobs + noise (so resampling filters matter), converted to ``mode``."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 120 * np.sin(x / (7 + 13 * rng.rand()) + rng.rand() * 6),
            127 + 120 * np.cos(y / (5 + 11 * rng.rand()) + rng.rand() * 6),
            255 * (x + y) / (width + height),
        ],
        axis=-1,
    )
    base += rng.normal(0, 25, size=base.shape)
    for _ in range(4):
        cx, cy, r = rng.rand() * width, rng.rand() * height, 5 + rng.rand() * max(width, height) / 4
        blob = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        base[blob] = rng.rand(3) * 255
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = (np.clip(np.sin(x / 9.0) * 300 + 128, 0, 255)).astype(np.uint8)  # includes fully transparent
        img.putalpha(Image.fromarray(alpha, "L"))
        return img
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return img.convert(mode)


# size, mode, expected tiles at max_tiles=6 (models.md §2.5 worked examples)
IMAGES = {
    "1920x1080": ((1920, 1080), "RGB", 7),
    "letter-1275x1650": ((1275, 1650), "RGB", 7),
    "1280x680": ((1280, 680), "RGB", 3),
    "300x90": ((300, 90), "RGB", 4),
    "512x512": ((512, 512), "RGB", 1),
    "rgba-600x300": ((600, 300), "RGBA", 3),
    "palette-700x300": ((700, 300), "P", 3),
    "gray-300x600": ((300, 600), "L", 3),
    "extreme-2400x40": ((2400, 40), "RGB", None),
}


@pytest.fixture(scope="module")
def images():
    return {name: synthetic(*size, seed=k, mode=mode) for k, (name, (size, mode, _)) in enumerate(IMAGES.items())}


@pytest.fixture(scope="module")
def vl(tiny_vl):
    return load_reranker(tiny_vl, device="cpu")


@pytest.fixture(scope="module")
def ref(tiny_vl):
    from tests.reference_vl import ReferenceVLReranker

    return ReferenceVLReranker(tiny_vl)


def assert_parity(vl, ref, docs, query=QUERY, max_length=10240, max_tiles=6):
    mine = np.array(vl.score(query, docs, max_length=max_length, max_tiles=max_tiles))
    want = np.array(ref.score_docs(query, docs, max_length=max_length, max_tiles=max_tiles))
    assert np.abs(want).max() > 0.05, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(mine, want, atol=PARITY_ATOL, rtol=0)
    return np.abs(mine - want).max()


# ------------------------------------------------------------------------------------------- parity
def test_parity_text_only(vl, ref):
    assert_parity(vl, ref, TEXTS + ["", "protein", LONG])


def test_parity_text_only_truncated_at_64(vl, ref):
    assert_parity(vl, ref, [LONG, TEXTS[0] * 5, TEXTS[1]], max_length=64)


def test_parity_image_only_many_sizes_and_modes(vl, ref, images):
    docs = [{"image": im} for im in images.values()]
    assert_parity(vl, ref, docs)


def test_parity_image_plus_text(vl, ref, images):
    docs = [
        {"image": images["1920x1080"], "text": TEXTS[0]},
        {"image": images["1280x680"], "text": TEXTS[1]},
        {"image": images["rgba-600x300"], "text": TEXTS[2]},
        {"image": images["palette-700x300"], "text": LONG},
    ]
    assert_parity(vl, ref, docs)


def test_parity_mixed_batch(vl, ref, images):
    docs = [
        TEXTS[0],
        {"image": images["300x90"]},
        {"text": TEXTS[1], "image": images["gray-300x600"]},
        {"text": "", "image": images["512x512"]},
        {"text": TEXTS[2]},
        {"image": images["extreme-2400x40"], "text": "a very wide strip"},
    ]
    assert_parity(vl, ref, docs)


def test_parity_truncation_cuts_text_not_image(vl, ref, images):
    """Limits that cut the passage but leave the image block whole (1 tile: 259 tokens with BOS)."""
    docs = [{"image": images["512x512"], "text": LONG}, {"image": images["1280x680"], "text": LONG}, LONG]
    with pytest.raises(InputTooLong, match="image block"):
        vl.encode(QUERY, docs, max_length=300)  # the 3-tile block alone is 771 tokens with BOS
    assert list(vl.encode(QUERY, docs, max_length=800).truncated) == [0, 1]
    assert list(vl.encode(QUERY, docs[:1] + docs[2:], max_length=300).truncated) == [0, 1]
    assert_parity(vl, ref, docs[:1] + docs[2:], max_length=300)
    assert_parity(vl, ref, docs, max_length=800)


def test_parity_max_tiles_one(vl, ref, images):
    docs = [{"image": images["1920x1080"]}, {"image": images["letter-1275x1650"], "text": TEXTS[0]}]
    enc = vl.encode(QUERY, docs, max_tiles=1)
    assert enc.num_tiles.tolist() == [1, 1]
    assert enc.tiles.shape == (2, 512, 512, 3)
    assert_parity(vl, ref, docs, max_tiles=1)


def test_tile_order_matters_and_is_followed(vl, ref, images):
    """Swapping two tiles changes the logit, and both orders agree with the reference."""
    enc = vl.encode(QUERY, [{"image": images["1280x680"], "text": TEXTS[0]}])
    row, tiles = enc.pair(0), enc.pair_tiles(0)
    swapped = tiles[[1, 0, 2]]
    a = vl.forward_rows([row], [tiles])[0]
    b = vl.forward_rows([row], [swapped])[0]
    assert abs(a - b) > 1e-3
    ids = torch.from_numpy(row.astype(np.int64))[None]
    mask = torch.ones_like(ids)
    for t, mine in ((tiles, a), (swapped, b)):
        pv = torch.from_numpy(t).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5).to(torch.bfloat16).float()
        want = ref.forward_ids(ids, mask, pv)[0].item()
        assert abs(mine - want) < PARITY_ATOL


# --------------------------------------------------------------------------------- batching and padding
def test_batched_equals_single_mixed(vl, images):
    docs = [
        TEXTS[0],
        {"image": images["300x90"]},
        {"text": TEXTS[1], "image": images["1280x680"]},
        {"text": LONG},
        {"image": images["512x512"], "text": TEXTS[2]},
    ]
    batched = vl.score(QUERY, docs)
    single = [vl.score(QUERY, [d])[0] for d in docs]
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


def test_small_tile_and_token_budgets_equal_large(vl, images):
    from rerank_core.vl_reranker import VLReranker

    docs = [{"image": images["300x90"]}, TEXTS[0], {"image": images["1280x680"], "text": TEXTS[1]}, TEXTS[2]]
    small = VLReranker(vl.info, vl.model, vl.tokenizer, vl.device, vl.dtype, max_batch_tokens=1, max_batch_tiles=1)
    big = VLReranker(vl.info, vl.model, vl.tokenizer, vl.device, vl.dtype, max_batch_tokens=1 << 20)
    np.testing.assert_allclose(small.score(QUERY, docs), big.score(QUERY, docs), atol=1e-5, rtol=0)


def test_pack_respects_tile_budget(vl, images):
    enc = vl.encode(QUERY, [{"image": images["300x90"]}] * 5)  # 4 tiles each
    calls = []
    original = vl._forward_batch

    def spy(rows, tiles):
        calls.append(sum(len(t) for t in tiles if t is not None))
        return original(rows, tiles)

    vl.max_batch_tiles, vl._forward_batch = 8, spy
    try:
        vl.forward_encoded(enc)
    finally:
        vl.max_batch_tiles = 64
        del vl._forward_batch
    assert calls and max(calls) <= 8 and sum(calls) == 20


# ------------------------------------------------------------------------------------- vision pieces
def test_vision_tower_matches_transformers_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from rerank_core.config import SiglipVisionConfig as MyConfig
    from rerank_core.models.nemotron_vl import SiglipVisionTower

    d = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3}
    d.update(image_size=64, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    torch.manual_seed(0)
    hf_cfg = SiglipVisionConfig(**d)
    hf_cfg._attn_implementation = "eager"
    hf = SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # non-trivial norms and biases everywhere
            p.add_(torch.randn_like(p) * 0.2)
    mine = SiglipVisionTower(MyConfig.from_dict(d)).eval()
    state = {f"vision_model.{k}": v for k, v in hf.state_dict().items() if not k.startswith("head.")}
    mine.load_state_dict(state, strict=True)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        got = mine(x)
    assert got.shape == (3, 16, 48)
    assert (got - want).abs().max().item() < 1e-5


def test_pixel_shuffle_equals_formula_and_nvidia_sequence():
    from rerank_core.models.nemotron_vl import pixel_shuffle
    from tests.reference_vl import nvidia_pixel_shuffle

    t, g, c = 2, 8, 5
    x = torch.randn(t, g, g, c)
    out = pixel_shuffle(x, 2)
    assert out.shape == (t, g // 2, g // 2, 4 * c)
    formula = torch.empty_like(out)
    for a in range(g // 2):
        for b in range(g // 2):
            for m in range(2):
                for k in range(2):
                    formula[:, a, b, (2 * m + k) * c : (2 * m + k + 1) * c] = x[:, 2 * a + m, 2 * b + k, :]
    assert torch.equal(out, formula)
    assert torch.equal(nvidia_pixel_shuffle(x, 0.5), formula)


def test_pixels_are_bf16_table_values(vl, images):
    tiles = vl.encode(QUERY, [{"image": images["300x90"]}]).tiles
    got = vl.model.normalize_tiles(torch.from_numpy(tiles))
    want = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5).to(torch.bfloat16).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)


# ----------------------------------------------------------------------------------- prompts and tokens
def test_grid_candidate_order_matches_spec():
    from tests.reference_vl import grid_candidates

    assert grid_candidates(6) == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1),
                                  (6, 1), (2, 3), (1, 6), (3, 2)]  # fmt: skip


def test_tiles_and_block_lengths(vl, images):
    names = list(IMAGES)
    enc = vl.encode(QUERY, [{"image": images[n]} for n in names])
    tok = vl.tokenizer
    for i, n in enumerate(names):
        want = IMAGES[n][2]
        if want is not None:
            assert enc.num_tiles[i] == want, n
        row = enc.pair(i)
        t = int(enc.num_tiles[i])
        assert np.count_nonzero(row == tok.img_context_id) == 256 * t
        assert row[0] == tok.bos_id and row[1] == tok.img_start_id and row[2 + 256 * t] == tok.img_end_id
        assert (row[2 : 2 + 256 * t] == tok.img_context_id).all()
    first = enc.pair(0)
    assert 2 + 256 * 7 == 1794 and first[1 : 1 + 1794][-1] == tok.img_end_id
    tail = tok.encode_plain(f" question:{QUERY} \n \n passage:").ids
    assert first[1 + 1794 :].tolist() == tail
    assert enc.tiles.shape == (int(enc.num_tiles.sum()), 512, 512, 3) and enc.tiles.dtype == np.uint8


def test_tokens_match_transformers_tokenizer_of_full_prompt(vl, ref, images):
    docs = [TEXTS[0], {"image": images["1280x680"], "text": LONG}, {"image": images["300x90"]}, {"text": LONG}]
    texts, _ = ref.prompts(QUERY, docs)
    for max_length in (10240, 1100):  # 1100 cuts the passage of document 1, not its 3-tile block
        enc = vl.encode(QUERY, docs, max_length=max_length)
        for i, text in enumerate(texts):
            want = ref.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            assert enc.pair(i).tolist() == want


def test_image_block_never_truncated(vl, images):
    doc = {"image": images["512x512"], "text": LONG}
    for limit in (259, 260, 280):
        enc = vl.encode(QUERY, [doc], max_length=limit)
        row = enc.pair(0)
        assert len(row) == limit and row[258] == vl.tokenizer.img_end_id
        assert np.count_nonzero(row == vl.tokenizer.img_context_id) == 256
    with pytest.raises(InputTooLong, match="image block"):
        vl.encode(QUERY, [doc], max_length=258)
    with pytest.raises(InputTooLong):
        vl.encode(QUERY, [{"image": images["1920x1080"]}], max_length=1794)  # 1794 + BOS does not fit
    with pytest.raises(InputTooLong):
        vl.encode(QUERY, [doc], max_length=300, truncate="NONE")


def test_chunked_image_document_repeats_its_tiles(vl, images):
    docs = [{"image": images["512x512"], "text": LONG * 2}, TEXTS[0], {"image": images["1280x680"]}]
    enc = vl.encode(QUERY, docs, max_length=800, truncate="CHUNK")
    chunks = int((enc.doc_index == 0).sum())
    assert chunks > 1
    assert enc.num_tiles.tolist() == [1] * chunks + [0, 3]
    assert enc.tiles.shape[0] == chunks + 3
    for i in range(chunks):
        assert np.array_equal(enc.pair_tiles(i), enc.pair_tiles(0))
        assert np.count_nonzero(enc.pair(i) == vl.tokenizer.img_context_id) == 256
        assert len(enc.pair(i)) <= 800
    scores = vl.score(QUERY, docs, max_length=800, truncate="CHUNK")
    assert len(scores) == 3 and np.isfinite(scores).all()


@pytest.mark.parametrize("literal", ["<img>", "<IMG_CONTEXT>", "</img>", "<image>", "<|begin_of_text|>"])
def test_special_strings_in_user_text_stay_plain(vl, images, literal):
    q = f"{literal} what {literal}?"
    docs = [f"text {literal} here", {"image": images["512x512"], "text": f"{literal}{literal}"}, {"text": literal}]
    enc = vl.encode(q, docs)
    tok = vl.tokenizer
    for i in range(len(docs)):
        row = enc.pair(i)
        assert np.count_nonzero(row == tok.bos_id) == 1
        user = row[259:] if i == 1 else row[1:]
        assert user.max() < SPECIAL_START
    assert np.count_nonzero(enc.pair(1) == tok.img_context_id) == 256
    # round trip: nothing deleted (the reference drops the first "<image>"), nothing made special
    assert tok.plain.decode(enc.pair(0)[1:].tolist()) == f"question:{q} \n \n passage:{docs[0]}"
    assert np.isfinite(vl.score(q, docs)).all()


# ------------------------------------------------------------------------------------------ input forms
def test_image_input_forms_agree(vl, images, tmp_path):
    img = images["300x90"]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    raw = buf.getvalue()
    b64 = base64.b64encode(raw).decode()
    path = tmp_path / "page.png"
    path.write_bytes(raw)
    forms = [img, raw, b64, f"data:image/png;base64,{b64}", str(path), path]
    scores = vl.score(QUERY, [{"image": f, "text": TEXTS[0]} for f in forms])
    np.testing.assert_allclose(scores, scores[0], atol=1e-6, rtol=0)
    assert vl.score(QUERY, [{"image": img}]) == vl.score(QUERY, [{"image": img, "text": ""}])


def test_invalid_inputs(vl, images):
    img = images["512x512"]
    for bad_query in ({"image": img}, img, b"\x89PNG", None):
        with pytest.raises(InvalidInput, match="query"):
            vl.score(bad_query, ["x"])
    with pytest.raises(InvalidInput, match="one image per document"):
        vl.score(QUERY, [{"image": [img, img]}])
    with pytest.raises(InvalidInput, match="unknown field"):
        vl.score(QUERY, [{"text": "x", "images": img}])
    with pytest.raises(InvalidInput):
        vl.score(QUERY, [{"text": 3}])
    with pytest.raises(InvalidInput):
        vl.score(QUERY, [{"image": "not an image at all"}])
    with pytest.raises(InvalidInput, match="max_tiles"):
        vl.score(QUERY, [{"image": img}], max_tiles=0)


def test_image_limits_are_configurable(vl, images):
    from rerank_core.vl_reranker import VLReranker

    strict = VLReranker(
        vl.info, vl.model, vl.tokenizer, vl.device, vl.dtype, image_limits=ImageLimits(max_pixels=100_000)
    )
    with pytest.raises(PayloadTooLarge):
        strict.score(QUERY, [{"image": images["1920x1080"]}])
    assert len(strict.score(QUERY, [{"image": images["300x90"]}])) == 1


def test_image_sent_to_text_model_names_the_vl_model(tiny_text, images):
    text = load_reranker(tiny_text, device="cpu")
    with pytest.raises(InvalidInput, match="nvidia/llama-nemotron-rerank-vl-1b-v2"):
        text.score(QUERY, [{"image": images["512x512"]}])


def test_rerank_accepts_max_tiles(vl, images):
    docs = [{"image": images["1920x1080"]}, TEXTS[0], {"image": images["300x90"], "text": TEXTS[1]}]
    ranked = vl.rerank(QUERY, docs, max_tiles=2, top_n=2)
    assert len(ranked) == 2
    logits = vl.score(QUERY, docs, max_tiles=2)
    assert ranked[0].logit == pytest.approx(max(logits), abs=1e-6)


def test_model_refuses_misaligned_image_tokens(vl, images):
    enc = vl.encode(QUERY, [{"image": images["1280x680"]}])
    ids = torch.from_numpy(enc.pair(0).astype(np.int64))[None]
    mask = torch.ones_like(ids)
    with torch.inference_mode(), pytest.raises(InvalidInput, match="IMG_CONTEXT"):
        vl.model(ids, mask, tiles=torch.from_numpy(enc.tiles[:2]))
    with torch.inference_mode(), pytest.raises(InvalidInput, match="IMG_CONTEXT"):
        vl.model(ids, mask, tiles=None)
    with pytest.raises(InvalidInput):
        vl.forward_rows([enc.pair(0)], [enc.tiles[:1]])


def test_bf16_runs_and_stays_close(tiny_vl, vl, images):
    r16 = load_reranker(tiny_vl, device="cpu", dtype="bfloat16")
    assert r16.model.score.weight.dtype == torch.float32
    assert r16.model.vision_dtype == torch.bfloat16
    docs = [TEXTS[0], {"image": images["512x512"], "text": TEXTS[1]}]
    a, b = np.array(vl.score(QUERY, docs)), np.array(r16.score(QUERY, docs))
    assert np.abs(a - b).max() < 0.25


# ----------------------------------------------------------------------------------------- loading
def _copy_with(tiny_vl, tmp_path, change):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ckpt"
    shutil.copytree(tiny_vl, out)
    sd = load_file(os.path.join(tiny_vl, "model.safetensors"))
    change(sd)
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_strict_loading(tiny_vl, tmp_path):
    from rerank_core.config import read_checkpoint_config
    from rerank_core.models.nemotron_vl import build_vl_model

    info = read_checkpoint_config(tiny_vl)
    model = build_vl_model(info, torch.float32)  # the published head tensors are present and skipped
    assert not any(".head." in k for k in model.state_dict())
    assert all(not p.is_meta for p in model.parameters()) and not model.pixel_table.is_meta

    def extra_vision(sd):
        sd["model.vision_model.vision_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    def extra_head(sd):
        sd["model.vision_model.vision_model.head.extra"] = torch.zeros(2)

    def missing(sd):
        del sd["model.mlp1.0.bias"]

    with pytest.raises(CheckpointError, match="unexpected"):
        build_vl_model(read_checkpoint_config(_copy_with(tiny_vl, tmp_path / "a", extra_vision)), torch.float32)
    with pytest.raises(CheckpointError, match="missing"):
        build_vl_model(read_checkpoint_config(_copy_with(tiny_vl, tmp_path / "b", missing)), torch.float32)
    build_vl_model(read_checkpoint_config(_copy_with(tiny_vl, tmp_path / "c", extra_head)), torch.float32)


def test_key_map():
    from rerank_core.models.nemotron_vl import vl_key_map

    nested = "model.vision_model.vision_model.encoder.layers.3.mlp.fc1.weight"
    assert vl_key_map(nested) == nested
    assert vl_key_map("model.vision_model.encoder.layers.3.mlp.fc1.weight") == nested  # flat layout
    assert vl_key_map("model.vision_model.vision_model.head.probe") is None
    assert vl_key_map("model.vision_model.head.mlp.fc1.bias") is None
    assert vl_key_map("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert vl_key_map("score.weight") == "score.weight"


def test_state_dict_keys_are_the_published_ones(tiny_vl):
    from safetensors import safe_open

    from rerank_core.config import read_checkpoint_config
    from rerank_core.models.nemotron_vl import NemotronVLForSequenceClassification

    with safe_open(os.path.join(tiny_vl, "model.safetensors"), framework="pt") as f:
        published = {k for k in f.keys() if ".vision_model.head." not in k}  # noqa: SIM118 (safe_open)
    with torch.device("meta"):
        model = NemotronVLForSequenceClassification(read_checkpoint_config(tiny_vl).config)
    assert set(model.state_dict()) == published


def test_forward_on_two_threads_at_once_equals_one_at_a_time(vl, images):
    """Two passes of one VL model at once (a CPU scorer runs one per thread) give each its own result."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [[TEXTS[0], {"image": images["300x90"]}], [{"text": TEXTS[1], "image": images["gray-300x600"]}]] * 3
    alone = [np.array(vl.score(QUERY, j)) for j in jobs[:2]]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda j: np.array(vl.score(QUERY, j)), jobs))
    for k, got in enumerate(together):
        np.testing.assert_allclose(got, alone[k % 2], atol=1e-6, rtol=0)
