"""Unit tests for rerank_core.imaging: bounded decoding, reference-exact tiling, bf16 normalisation."""

from __future__ import annotations

import ast
import base64
import io
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from rerank_core.errors import InvalidInput, PayloadTooLarge
from rerank_core.imaging import (
    BF16_PIXEL_TABLE,
    ImageLimits,
    bf16_round,
    candidate_grids,
    choose_grid,
    decode_image,
    load_image_any,
    normalize_tiles_reference,
    num_image_tokens,
    prepare_image,
    tile_image,
    tiles_to_array,
)

S = 512
RNG_SEED = 1234


# ------------------------------------------------------------------------------------------------ helpers
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_url(raw: bytes, subtype: str) -> str:
    return f"data:image/{subtype};base64," + base64.b64encode(raw).decode()


def noise(w: int, h: int, mode: str = "RGB", seed: int = RNG_SEED) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    return noise(w, h, "RGB", seed).convert(mode)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h (8-bit gray) but carries only a stub IDAT: decoding pixels would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# Independent reference of the grid rule (models.md §2.5): the same set-insertion sequence as NVIDIA's
# generator expression, then max() over an explicit score list (max returns the FIRST maximal item).
def ref_candidates(mx: int, mn: int = 1) -> list[tuple[int, int]]:
    s = {(i, j) for n in range(mn, mx + 1) for i in range(1, n + 1) for j in range(1, n + 1) if mn <= i * j <= mx}
    return sorted(s, key=lambda g: g[0] * g[1])


def ref_grid(w: int, h: int, mx: int, mn: int = 1, size: int = S) -> tuple[int, int]:
    cands = ref_candidates(mx, mn)
    a = w / h
    scores = [min((c * r * size * size) / (w * h), 0.6) * min((c / r) / a, a / (c / r)) for c, r in cands]
    return cands[max(range(len(cands)), key=scores.__getitem__)]


def hand_tiles(img: Image.Image, cols: int, rows: int, thumb: bool = True) -> np.ndarray:
    """Tile in the original mode, then convert each tile to RGB, computed with numpy slicing."""
    big = np.asarray(img.resize((S * cols, S * rows)).convert("RGB"))
    out = [big[r * S : (r + 1) * S, c * S : (c + 1) * S] for r in range(rows) for c in range(cols)]
    if thumb and cols * rows > 1:
        out.append(np.asarray(img.resize((S, S)).convert("RGB")))
    return np.stack(out)


# ------------------------------------------------------------------------------------------------- grids
def test_candidate_grid_order_for_six():
    assert candidate_grids(6) == [
        (1, 1),
        (1, 2),
        (2, 1),
        (3, 1),
        (1, 3),
        (4, 1),
        (1, 4),
        (2, 2),
        (1, 5),
        (5, 1),
        (6, 1),
        (2, 3),
        (1, 6),
        (3, 2),
    ]


@pytest.mark.parametrize("mx", range(1, 25))
def test_candidate_grids_match_reference_construction(mx):
    for mn in sorted({1, min(2, mx), max(1, mx // 2), mx}):
        got = candidate_grids(mx, mn)
        assert got == ref_candidates(mx, mn)
        assert set(got) == {(i, j) for i in range(1, mx + 1) for j in range(1, mx + 1) if mn <= i * j <= mx}


def test_plain_set_comprehension_order_would_differ():
    # Why the module replicates the reference's generator exactly: a plain i, j comprehension iterates the
    # set in another order for some maxima, which changes tie-breaking.
    plain = sorted({(i, j) for i in range(1, 17) for j in range(1, 17) if i * j <= 16}, key=lambda g: g[0] * g[1])
    assert plain != candidate_grids(16)


@pytest.mark.parametrize(
    "w,h,grid,n_tiles",
    [
        (1920, 1080, (3, 2), 7),
        (1275, 1650, (2, 3), 7),
        (1280, 680, (2, 1), 3),
        (300, 90, (3, 1), 4),
        (512, 512, (1, 1), 1),
        (2480, 3508, (2, 3), 7),
    ],
)
def test_worked_examples(w, h, grid, n_tiles):
    assert choose_grid(w, h) == grid
    tiles = tile_image(Image.new("RGB", (w, h), (10, 20, 30)))
    assert len(tiles) == n_tiles
    assert all(t.size == (S, S) for t in tiles)
    assert num_image_tokens(len(tiles)) == n_tiles * 256 + 2


def test_max_image_block_tokens():
    assert num_image_tokens(7) == 1794


SWEEP = [
    1,
    2,
    3,
    5,
    7,
    10,
    16,
    31,
    64,
    90,
    100,
    128,
    200,
    256,
    300,
    333,
    480,
    500,
    511,
    512,
    513,
    600,
    640,
    680,
    720,
    768,
    800,
    900,
    1000,
    1024,
    1080,
    1275,
    1280,
    1500,
    1650,
    1920,
    2048,
    2480,
    2500,
    3000,
    3508,
    4000,
]


@pytest.mark.parametrize("mx", range(1, 13))
def test_grid_sweep_matches_reference(mx):
    for w in SWEEP:
        for h in SWEEP:
            assert choose_grid(w, h, mx) == ref_grid(w, h, mx), (w, h, mx)


def test_sweep_contains_real_ties():
    # The tie order is only exercised if exact ties occur in the sweep.
    ties = 0
    for w in SWEEP:
        for h in SWEEP:
            a = w / h
            sc = [min((c * r * S * S) / (w * h), 0.6) * min((c / r) / a, a / (c / r)) for c, r in candidate_grids(6)]
            ties += sc.count(max(sc)) > 1
    assert ties > 10


def test_min_tiles_respected():
    assert choose_grid(512, 512, max_tiles=6, min_tiles=2) in candidate_grids(6, 2)
    with pytest.raises(ValueError):
        candidate_grids(2, 3)


# ------------------------------------------------------------------------------------------------ tiling
def test_tile_order_row_major_2x2():
    img = Image.new("RGB", (1024, 1024))
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    for k, col in enumerate(colors):
        img.paste(col, ((k % 2) * 512, (k // 2) * 512, (k % 2 + 1) * 512, (k // 2 + 1) * 512))
    arr = tiles_to_array(tile_image(img))
    assert arr.shape == (5, S, S, 3)
    for k, col in enumerate(colors):
        assert (arr[k] == np.array(col, np.uint8)).all(), k
    assert (arr[4] != arr[0]).any()  # thumbnail is the whole image


def test_tile_order_row_major_3x2():
    img = Image.new("RGB", (1536, 1024))
    colors = [(10 * k + 5, 200 - 20 * k, 40 * k) for k in range(6)]
    for k, col in enumerate(colors):
        c, r = k % 3, k // 3
        img.paste(col, (c * 512, r * 512, (c + 1) * 512, (r + 1) * 512))
    assert choose_grid(1536, 1024) == (3, 2)
    arr = tiles_to_array(tile_image(img))
    assert arr.shape == (7, S, S, 3)
    for k, col in enumerate(colors):
        assert (arr[k] == np.array(col, np.uint8)).all(), k


def test_tiles_array_layout():
    arr = tiles_to_array(tile_image(noise(300, 90)))
    assert arr.dtype == np.uint8 and arr.shape == (4, S, S, 3) and arr.flags.c_contiguous


def test_no_thumbnail_option():
    assert len(tile_image(Image.new("RGB", (1920, 1080)), use_thumbnail=False)) == 6


def _rgba_with_holes():
    img = noise(700, 300, "RGBA")
    a = np.array(img)
    a[:, :200, 3] = 0  # fully transparent band (with random colour underneath)
    a[:, 200:400, 3] = 128  # half transparent band
    return Image.fromarray(a)


def _palette(transparency=None):
    img = noise(640, 333, "RGB").quantize(colors=64)
    if transparency == "index":
        img.info["transparency"] = 3
    elif transparency == "bytes":
        img.info["transparency"] = bytes([0, 128] + [255] * 62)
    return img


def _i16():
    rng = np.random.default_rng(RNG_SEED)
    return Image.fromarray(rng.integers(0, 65535, (120, 400), dtype=np.uint16))


MODE_IMAGES = {
    "RGBA": _rgba_with_holes,
    "P": _palette,
    "P+trns-index": lambda: _palette("index"),
    "P+trns-bytes": lambda: _palette("bytes"),
    "L": lambda: noise(300, 700, "L"),
    "LA": lambda: _rgba_with_holes().convert("LA"),
    "1": lambda: noise(500, 260, "L").convert("1"),
    "I;16": _i16,
    "CMYK": lambda: noise(420, 300, "CMYK"),
}


@pytest.mark.parametrize("name", list(MODE_IMAGES))
def test_modes_tile_in_original_mode(name):
    img = MODE_IMAGES[name]()
    if name == "I;16":
        try:
            img.resize((3, 3)).convert("RGB")
        except (ValueError, OSError) as e:  # pragma: no cover - depends on the Pillow build
            pytest.skip(f"this Pillow cannot resize/convert I;16: {e}")
        assert img.mode.startswith("I;16")
    cols, rows = choose_grid(*img.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out of the module
        arr = tiles_to_array(tile_image(img))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hand_tiles(img, cols, rows)
    assert arr.shape == expected.shape == (cols * rows + (cols * rows > 1), S, S, 3)
    assert np.array_equal(arr, expected)


@pytest.mark.parametrize("name", ["RGBA", "P", "LA"])
def test_rgb_first_differs(name):
    img = MODE_IMAGES[name]()
    ours = tiles_to_array(tile_image(img))
    rgb_first = tiles_to_array(tile_image(img.convert("RGB")))
    assert not np.array_equal(ours, rgb_first)


def test_grayscale_unaffected_by_order():
    img = MODE_IMAGES["L"]()
    assert np.array_equal(tiles_to_array(tile_image(img)), tiles_to_array(tile_image(img.convert("RGB"))))


def test_rgba_transparent_pixels():
    a = np.zeros((600, 600, 4), np.uint8)
    a[..., :3] = 200  # colour under full transparency
    out = tiles_to_array(tile_image(Image.fromarray(a)))
    assert out.shape == (1, S, S, 3) and (out == 0).all()  # premultiplied resize: transparent -> black
    # No resize at 512x512 (PIL returns a copy): the hidden colour survives, alpha is just dropped.
    out = tiles_to_array(tile_image(Image.fromarray(a[:512, :512])))
    assert (out == 200).all()


def test_cmyk_jpeg_decodes_in_cmyk_and_tiles():
    raw = encode(noise(420, 300, "CMYK"), "JPEG", quality=90)
    img = decode_image(data_url(raw, "jpeg"))
    assert img.mode == "CMYK"
    cols, rows = choose_grid(*img.size)
    assert np.array_equal(tiles_to_array(tile_image(img)), hand_tiles(img, cols, rows))


def test_extreme_aspect():
    img = Image.new("L", (1, 5000), 77)
    assert choose_grid(1, 5000) == (1, 6)
    arr = prepare_image(img)
    assert arr.shape == (7, S, S, 3) and (arr == 77).all()
    tall = encode(Image.new("L", (1, 100_000)), "PNG")
    with pytest.raises(PayloadTooLarge, match="side"):
        decode_image(tall)
    arr = prepare_image(tall, limits=ImageLimits(max_side=200_000))
    assert arr.shape == (7, S, S, 3)


# ----------------------------------------------------------------------------------------------- decoding
FORMATS = [
    ("PNG", "png", {}),
    ("JPEG", "jpeg", {"quality": 95}),
    ("JPEG", "jpg", {}),
    ("WEBP", "webp", {"lossless": True}),
    ("GIF", "gif", {}),
    ("BMP", "bmp", {}),
    ("TIFF", "tiff", {}),
]


@pytest.mark.parametrize("fmt,subtype,kw", FORMATS, ids=[f[1] for f in FORMATS])
def test_round_trip_all_forms(fmt, subtype, kw):
    if fmt == "WEBP" and not features.check("webp"):  # pragma: no cover
        pytest.skip("Pillow built without WebP")
    src = noise(64, 48) if fmt != "GIF" else noise(64, 48).quantize(colors=32)
    raw = encode(src, fmt, **kw)
    b64 = base64.b64encode(raw).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    forms = [
        raw,
        bytearray(raw),
        data_url(raw, subtype),
        b64,
        "  " + wrapped + "\n",
        urlsafe,
        f"DATA:Image/{subtype.upper()};BASE64," + b64,
    ]
    for form in forms:
        img = decode_image(form)
        assert img.format == fmt and img.size == (64, 48)
        if fmt in ("PNG", "WEBP", "BMP", "TIFF"):
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(src))
        if fmt == "GIF":
            assert img.mode == "P"


def test_original_mode_kept():
    assert decode_image(encode(_rgba_with_holes(), "PNG")).mode == "RGBA"
    assert decode_image(encode(_palette("index"), "PNG")).mode == "P"
    assert decode_image(encode(MODE_IMAGES["LA"](), "PNG")).mode == "LA"
    assert decode_image(encode(MODE_IMAGES["1"](), "PNG")).mode == "1"


def test_truncated_png_and_jpeg():
    for fmt in ("PNG", "JPEG"):
        raw = encode(noise(256, 256), fmt)
        with pytest.raises(InvalidInput, match="could not decode image") as ei:
            decode_image(raw[: len(raw) // 2])
        assert "Traceback" not in ei.value.message


@pytest.mark.parametrize(
    "bad",
    [
        base64.b64encode(np.random.default_rng(0).bytes(3000)).decode(),  # valid base64, not an image
        "this is not base64!!",
        "QUJD$$$=",
        "A",
        "",
        "   ",
        b"",
        b"GIF89a-not-really",
        "data:image/png;base64,",
        "data:image/png;base64,@@@@",
        "data:image/png,iVBORw0KGgo=",  # not base64-encoded
        "data:image/png;base64",  # no comma
        "file:///etc/passwd",
        "ftp://example.com/a.png",
    ],
)
def test_invalid_inputs(bad):
    with pytest.raises(InvalidInput):
        decode_image(bad)


def test_wrong_type():
    with pytest.raises(InvalidInput):
        decode_image(12345)


@pytest.mark.parametrize("media", ["image/svg+xml", "text/plain", "application/octet-stream", "image/heic", ""])
def test_unsupported_data_url_media_type(media):
    with pytest.raises(InvalidInput, match="image/png") as ei:
        decode_image(f"data:{media};base64," + base64.b64encode(encode(noise(8, 8), "PNG")).decode())
    assert ei.value.param is None


def test_remote_urls_refused():
    for url in ("http://example.com/a.png", "HTTPS://example.com/a.png", "  https://x/y"):
        with pytest.raises(InvalidInput, match="disabled") as ei:
            decode_image(url, param="documents[0].image")
        assert "data URL" in ei.value.message and ei.value.param == "documents[0].image"


def test_format_outside_allowed_list():
    raw = encode(noise(16, 16), "PNG")
    with pytest.raises(InvalidInput, match="accepted"):
        decode_image(raw, ImageLimits(allowed_formats=("JPEG",)))
    ico = encode(noise(16, 16), "ICO")
    with pytest.raises(InvalidInput):
        decode_image(ico)


@pytest.fixture
def no_load(monkeypatch):
    """Any pixel decoding makes the test fail: the bound must be hit from the header alone."""

    def boom(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


@pytest.mark.parametrize(
    "w,h,limits",
    [
        (30000, 30000, ImageLimits()),  # above 2x PIL's global bound: PIL raises, mapped to 413
        (10000, 10000, ImageLimits()),  # between PIL's warning and error bounds: our own check
        (7000, 7000, ImageLimits()),  # 49 MP > 40 MP default
        (100, 100, ImageLimits(max_pixels=5000)),
    ],
)
def test_decompression_bomb_rejected_from_header(no_load, w, h, limits):
    before = Image.MAX_IMAGE_PIXELS
    raw = png_header_only(w, h)
    assert len(raw) < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for form in (raw, data_url(raw, "png")):
            with pytest.raises(PayloadTooLarge, match="pixels") as ei:
                decode_image(form, limits)
            assert str(w * h) in ei.value.message and str(limits.max_pixels) in ei.value.message
    assert Image.MAX_IMAGE_PIXELS == before


def test_header_only_png_is_invalid_when_within_bounds():
    with pytest.raises(InvalidInput, match="could not decode image"):
        decode_image(png_header_only(100, 100))


def test_animated_gif_frames():
    frames = [Image.new("RGB", (40, 30), (90 * k, 255 - 90 * k, 7)).quantize(colors=4) for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    raw = buf.getvalue()
    with pytest.raises(InvalidInput, match="3 frames"):
        decode_image(data_url(raw, "gif"))
    img = decode_image(raw, ImageLimits(max_frames=3))
    assert img.size == (40, 30) and img.tell() == 0


def test_animated_webp_frames():
    if not features.check("webp"):  # pragma: no cover
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (20, 20), (k * 80, 0, 0)) for k in range(3)]
    raw = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    with pytest.raises(InvalidInput, match="frames"):
        decode_image(raw)


def test_multipage_tiff_frames():
    pages = [noise(20, 20, seed=k) for k in range(2)]
    raw = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    with pytest.raises(InvalidInput, match="2 frames"):
        decode_image(raw)


def test_mpo_camera_jpeg_accepted():
    views = [noise(32, 24, seed=k) for k in range(2)]
    try:
        raw = encode(views[0], "MPO", save_all=True, append_images=views[1:])
    except (KeyError, ValueError, OSError) as e:  # pragma: no cover
        pytest.skip(f"Pillow cannot write MPO: {e}")
    img = decode_image(data_url(raw, "jpeg"))
    assert img.size == (32, 24) and img.format == "MPO"


def test_too_many_bytes():
    raw = encode(noise(64, 64), "PNG")
    small = ImageLimits(max_bytes=1000)
    assert len(raw) > 1000
    for form in (raw, data_url(raw, "png"), base64.b64encode(raw).decode()):
        with pytest.raises(PayloadTooLarge, match="1000"):
            decode_image(form, small)


def test_size_estimated_before_base64_decoding():
    # Invalid base64 that is too long: the size bound answers (413) before any decoding (which would say 400).
    with pytest.raises(PayloadTooLarge):
        decode_image("!" * 5000, ImageLimits(max_bytes=1000))
    with pytest.raises(PayloadTooLarge):
        decode_image("data:image/png;base64," + "A" * 10_000_000, ImageLimits(max_bytes=1000))


def test_pil_image_passthrough():
    img = noise(30, 20)
    assert decode_image(img) is img
    with pytest.raises(PayloadTooLarge):
        decode_image(Image.new("1", (3000, 3000)), ImageLimits(max_pixels=1_000_000))
    with pytest.raises(InvalidInput):
        decode_image(Image.new("RGB", (0, 5)))


def test_load_image_any(tmp_path):
    raw = encode(noise(50, 40), "PNG")
    p = tmp_path / "page.png"
    p.write_bytes(raw)
    for x in (p, str(p), raw, data_url(raw, "png"), base64.b64encode(raw).decode(), noise(50, 40)):
        assert load_image_any(x).size == (50, 40)
    with pytest.raises(PayloadTooLarge):
        load_image_any(p, ImageLimits(max_bytes=100))
    with pytest.raises(InvalidInput):
        load_image_any(str(tmp_path / "missing.png"))


def test_prepare_image_end_to_end():
    raw = encode(noise(1920, 1080), "JPEG")
    arr = prepare_image(data_url(raw, "jpeg"))
    img = decode_image(raw)
    assert arr.shape == (7, S, S, 3)
    assert np.array_equal(arr, hand_tiles(img, 3, 2))
    assert prepare_image(raw, max_tiles=1).shape == (1, S, S, 3)


def test_no_pil_warnings_escape():
    raw = encode(_palette("bytes"), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr = prepare_image(data_url(raw, "png"))
    assert arr.shape[1:] == (S, S, 3)


def test_module_is_pure():
    import rerank_core.imaging as mod

    path = Path(mod.__file__)
    allowed = set(sys.stdlib_module_names) | {"numpy", "PIL", "rerank_core"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, name
            if name.startswith("rerank_core"):
                assert name == "rerank_core.errors", name
    # Importing it (bypassing the package __init__, which loads the models) pulls in no heavy framework.
    code = (
        "import sys, types; pkg = types.ModuleType('rerank_core'); pkg.__path__ = [sys.argv[1]]; "
        "sys.modules['rerank_core'] = pkg; import rerank_core.imaging; "
        "bad = {'torch', 'ray', 'starlette', 'fastapi'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(path.parent)], check=True)


# ------------------------------------------------------------------------------------------ normalisation
def test_bf16_table_matches_torch():
    import torch
    x = torch.arange(256, dtype=torch.uint8).float().div(255).sub(0.5).div(0.5)  # ToTensor + Normalize
    expected = x.to(torch.bfloat16).float().numpy()
    assert BF16_PIXEL_TABLE.dtype == np.float32 and BF16_PIXEL_TABLE.shape == (256,)
    assert np.array_equal(BF16_PIXEL_TABLE, expected)
    for k in range(256):  # element-wise, as the brief states it
        v = (k / 255 - 0.5) / 0.5
        assert BF16_PIXEL_TABLE[k] == torch.tensor(v).to(torch.bfloat16).float().item()
    assert BF16_PIXEL_TABLE[0] == -1.0 and BF16_PIXEL_TABLE[255] == 1.0


def test_bf16_round_matches_torch_including_ties():
    import torch
    rng = np.random.default_rng(RNG_SEED)
    x = rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000)
    bits = rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    ties = ((bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)  # exact half-way cases
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np.float32)
    vals = np.concatenate([x, ties, np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45])])
    vals = vals[~np.isnan(vals)]
    ours = bf16_round(vals)
    ref = torch.from_numpy(vals).to(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.isnan(bf16_round(np.float32([np.nan]))).all()


def test_truncation_would_differ():
    # Sanity: rounding is not truncation (the table would be wrong if it were).
    bits = np.arange(256, dtype=np.float32)
    v = ((bits / np.float32(255) - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)
    trunc = (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    assert not np.array_equal(trunc, BF16_PIXEL_TABLE)


def test_normalize_tiles_reference():
    arr = tiles_to_array(tile_image(noise(300, 90)))
    out = normalize_tiles_reference(arr)
    assert out.dtype == np.float32 and out.shape == (4, 3, S, S) and out.flags.c_contiguous
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert np.array_equal(out[2, 1], BF16_PIXEL_TABLE[arr[2, :, :, 1]])
    import torch
    ref = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5).to(torch.bfloat16).float()
    assert np.array_equal(out, ref.numpy())
    with pytest.raises(ValueError):
        normalize_tiles_reference(arr.astype(np.float32))
