"""Image decoding (bounded) and tiling for the VL reranker.

Pure module: stdlib, numpy and PIL only. Tiling reproduces NVIDIA's reference processor bit for bit
(models.md §2.5 and "Clarifications"): grid choice, PIL default resize filter in the image's ORIGINAL
mode, row-major crops, thumbnail last, per-tile RGB conversion, bf16-rounded normalisation.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import pathlib
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rerank_core.errors import InvalidInput, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Media types accepted in data URLs (``image/<subtype>``).
DATA_URL_SUBTYPES = ("png", "jpeg", "jpg", "webp", "gif", "bmp", "tiff")
TILE_SIZE = 512
TOKENS_PER_TILE = 256

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]{0,31}:")  # base64 never contains ':'
_BOMB_RE = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds checked before any pixel is decoded."""

    max_bytes: int = 20 * 1024 * 1024  # encoded image bytes (after base64 decoding)
    max_pixels: int = 40_000_000  # W * H
    max_frames: int = 1  # animated GIF/WebP/PNG/multi-page TIFF with more frames is refused
    max_side: int = 20_000
    min_side: int = 1
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS


DEFAULT_LIMITS = ImageLimits()


# ----------------------------------------------------------------------------------------------- decoding
def _b64decode(payload: str, limits: ImageLimits, param: str | None) -> bytes:
    """Standard or URL-safe base64, whitespace and missing padding tolerated; size checked first."""
    max_chars = 4 * (limits.max_bytes // 3 + 1)
    if len(payload) > 2 * max_chars + 1024:  # hopeless even if half of it were whitespace: skip the copy
        raise PayloadTooLarge(f"image is larger than the limit of {limits.max_bytes} bytes", param)
    compact = "".join(payload.split()).rstrip("=")
    if len(compact) * 3 // 4 > limits.max_bytes:
        raise PayloadTooLarge(
            f"image is about {len(compact) * 3 // 4} bytes, over the limit of {limits.max_bytes} bytes", param
        )
    if not compact:
        raise InvalidInput("image is empty", param)
    if len(compact) % 4 == 1:
        raise InvalidInput("image is not valid base64", param)
    compact = compact.translate(str.maketrans("-_", "+/")) + "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("image is not valid base64", param) from None


def _bytes_from_str(text: str, limits: ImageLimits, param: str | None) -> bytes:
    s = text.strip()
    head = s[:16].lower()
    if head.startswith(("http://", "https://")):
        raise InvalidInput(
            "remote image URLs are disabled (server-side fetching is off); "
            "send the image as a data URL (data:image/png;base64,...) or as bare base64",
            param,
        )
    if head.startswith("data:"):
        comma = s.find(",")
        if comma < 0:
            raise InvalidInput("malformed data URL: no ',' before the data", param)
        parts = [p.strip().lower() for p in s[5:comma].split(";")]
        accepted = ", ".join(f"image/{t}" for t in DATA_URL_SUBTYPES)
        media = parts[0]
        if not media.startswith("image/") or media[6:] not in DATA_URL_SUBTYPES:
            shown = repr(media) if media else "(none)"
            raise InvalidInput(f"unsupported media type {shown} in data URL; accepted: {accepted}", param)
        if "base64" not in parts[1:]:
            raise InvalidInput("data URLs must be base64-encoded (data:image/png;base64,...)", param)
        return _b64decode(s[comma + 1 :], limits, param)
    if _SCHEME_RE.match(s):
        raise InvalidInput(
            "unsupported image reference; send a data URL (data:image/png;base64,...) or bare base64", param
        )
    return _b64decode(s, limits, param)


def _check_size(size: tuple[int, int], limits: ImageLimits, param: str | None) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise PayloadTooLarge(f"image has {w * h} pixels ({w}x{h}), over the limit of {limits.max_pixels}", param)
    if max(w, h) > limits.max_side:
        raise PayloadTooLarge(f"image side {max(w, h)} px ({w}x{h}) is over the limit of {limits.max_side}", param)
    if min(w, h) < limits.min_side:
        raise InvalidInput(f"image is {w}x{h}; each side must be at least {limits.min_side} px", param)


@functools.cache
def _mode_supported(mode: str) -> bool:
    """Whether PIL can resize this mode and convert it to RGB (probed once on a 2x2 image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.new(mode, (2, 2)).resize((1, 1)).convert("RGB")
        return True
    except Exception:  # noqa: BLE001 - any failure means "unsupported"
        return False


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else "") or type(exc).__name__


def _open_checked(raw: bytes, limits: ImageLimits, param: str | None) -> Image.Image:
    if not raw:
        raise InvalidInput("image is empty", param)
    if len(raw) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(raw)} bytes, over the limit of {limits.max_bytes} bytes", param)
    accepted = ", ".join(limits.allowed_formats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warnings must never surface as errors (e.g. under -W error)
        try:
            # Lazy: reads the header only. PIL's own bomb check uses the global MAX_IMAGE_PIXELS; we neither
            # change nor rely on it: its error (only above 2x the global) is mapped here, our bound is below.
            im = Image.open(io.BytesIO(raw), formats=list(limits.allowed_formats))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            m = _BOMB_RE.search(str(e))
            n = m.group(1) if m else "too many"
            raise PayloadTooLarge(f"image has {n} pixels, over the limit of {limits.max_pixels}", param) from None
        except Image.UnidentifiedImageError:
            raise InvalidInput(f"data is not an image in an accepted format ({accepted})", param) from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - parser failures on untrusted data are the client's error
            raise InvalidInput(f"could not decode image: {_short_reason(e)}", param) from None
        _check_size(im.size, limits, param)
        fmt = im.format or "?"
        if fmt not in limits.allowed_formats and not (fmt == "MPO" and "JPEG" in limits.allowed_formats):
            raise InvalidInput(f"image format {fmt} is not accepted ({accepted})", param)
        if fmt != "MPO":  # MPO = camera JPEG with extra views/previews, not an animation: first frame is the photo
            try:
                frames = int(getattr(im, "n_frames", 1))
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - corrupt frame chain
                raise InvalidInput(f"could not decode image: {_short_reason(e)}", param) from None
            if frames > limits.max_frames:
                raise InvalidInput(
                    f"image has {frames} frames; animated or multi-page images are limited to {limits.max_frames}",
                    param,
                )
        if not _mode_supported(im.mode):
            raise InvalidInput(f"image mode {im.mode} is not supported", param)
        try:
            im.load()
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated/corrupt: OSError, SyntaxError, ValueError, EOFError...
            raise InvalidInput(f"could not decode image: {_short_reason(e)}", param) from None
    return im


def decode_image(data, limits: ImageLimits = DEFAULT_LIMITS, *, param: str | None = None) -> Image.Image:
    """Decode an untrusted image with every bound checked before pixels are decoded.

    ``data``: bytes, a ``data:image/<fmt>;base64,...`` URL, bare (standard or URL-safe) base64, or an open
    ``PIL.Image.Image`` (returned as-is after the size checks). The result keeps its ORIGINAL mode.
    Raises ``InvalidInput`` (400) or ``PayloadTooLarge`` (413); ``param`` is attached to the error.
    """
    if isinstance(data, Image.Image):
        _check_size(data.size, limits, param)
        if not _mode_supported(data.mode):
            raise InvalidInput(f"image mode {data.mode} is not supported", param)
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _open_checked(bytes(data), limits, param)
    if isinstance(data, str):
        return _open_checked(_bytes_from_str(data, limits, param), limits, param)
    raise InvalidInput(f"image must be a data URL or base64 string, not {type(data).__name__}", param)


def load_image_any(x, limits: ImageLimits = DEFAULT_LIMITS, *, param: str | None = None) -> Image.Image:
    """Python-API loader: bytes, PIL image, an existing file path (str or Path), data URL or base64 str."""
    is_file_str = isinstance(x, str) and len(x) < 4096 and not x.lstrip()[:5].lower().startswith("data:")
    if not (isinstance(x, os.PathLike) or (is_file_str and os.path.isfile(x))):
        return decode_image(x, limits, param=param)
    path = pathlib.Path(x)
    try:
        if path.stat().st_size > limits.max_bytes:
            raise PayloadTooLarge(f"image file is over the limit of {limits.max_bytes} bytes", param)
        raw = path.read_bytes()
    except OSError as e:
        raise InvalidInput(f"could not read image file: {_short_reason(e)}", param) from None
    return decode_image(raw, limits, param=param)


# ------------------------------------------------------------------------------------------------- tiling
@functools.lru_cache(maxsize=64)
def _grids(max_tiles: int, min_tiles: int) -> tuple[tuple[int, int], ...]:
    # Same set-insertion sequence as the reference (n outer, duplicates re-inserted): the set's iteration
    # order, which decides ties, depends on it (a plain i,j comprehension differs, e.g. for max 16).
    found = set()
    for n in range(min_tiles, max_tiles + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_tiles <= i * j <= max_tiles:
                    found.add((i, j))
    return tuple(sorted(found, key=lambda g: g[0] * g[1]))


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, in the reference's (tie-deciding) order."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    return list(_grids(max_tiles, min_tiles))


def choose_grid(
    width: int, height: int, max_tiles: int = 6, min_tiles: int = 1, tile_size: int = TILE_SIZE
) -> tuple[int, int]:
    """(cols, rows) maximising min(area, 0.6) * min(t/a, a/t) in float64; first best wins (strict >)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    grids = candidate_grids(max_tiles, min_tiles)
    aspect = width / height
    best, best_score = (1, 1), float("-inf")
    for cols, rows in grids:
        t = cols / rows
        area = (cols * rows * tile_size * tile_size) / (width * height)
        score = min(area, 0.6) * min(t / aspect, aspect / t)
        if score > best_score:
            best, best_score = (cols, rows), score
    return best


def tile_image(
    img: Image.Image, max_tiles: int = 6, min_tiles: int = 1, tile_size: int = TILE_SIZE, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Tiles of ``tile_size`` squared, in the image's original mode: grid row-major, then the thumbnail.

    Returns cols*rows tiles (+1 thumbnail when cols*rows > 1 and use_thumbnail). Resizes use PIL's
    default filter (BICUBIC; NEAREST for "1"/"P"; premultiplied alpha for RGBA/LA), as the reference does.
    """
    cols, rows = choose_grid(img.width, img.height, max_tiles, min_tiles, tile_size)
    s = tile_size
    resized = img.resize((s * cols, s * rows))
    tiles = [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(img.resize((s, s)))
    return tiles


def tiles_to_array(tiles: list[Image.Image]) -> np.ndarray:
    """uint8 array [T, S, S, 3] (HWC, contiguous); each tile converted to RGB after tiling (alpha dropped)."""
    if not tiles:
        raise ValueError("no tiles")
    w, h = tiles[0].size
    out = np.empty((len(tiles), h, w, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency expressed in bytes ..."
        for k, tile in enumerate(tiles):
            out[k] = np.asarray(tile if tile.mode == "RGB" else tile.convert("RGB"))
    return out


def prepare_image(
    data_or_img, max_tiles: int = 6, limits: ImageLimits = DEFAULT_LIMITS, tile_size: int = TILE_SIZE
) -> np.ndarray:
    """Decode (bounded) + tile + RGB: uint8 [T, S, S, 3] with T = cols*rows (+1 thumbnail if T > 1)."""
    return tiles_to_array(tile_image(decode_image(data_or_img, limits), max_tiles, 1, tile_size))


def num_image_tokens(num_tiles: int, per_tile: int = TOKENS_PER_TILE) -> int:
    """Length of the image block: per_tile tokens per tile plus ``<img>`` and ``</img>``."""
    return num_tiles * per_tile + 2


# --------------------------------------------------------------------------------------------- normalising
def bf16_round(x) -> np.ndarray:
    """float32 -> nearest bfloat16 (round to nearest, ties to even), returned as float32. NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    rounded = np.where(np.isnan(x), (bits | np.uint32(0x00400000)) & np.uint32(0xFFFF0000), rounded)
    return rounded.astype(np.uint32).view(np.float32)


def _pixel_table() -> np.ndarray:
    k = np.arange(256, dtype=np.float32)
    v = (k / np.float32(255) - np.float32(0.5)) / np.float32(0.5)  # float32 ops, as ToTensor + Normalize
    table = bf16_round(v)
    table.flags.writeable = False
    return table


# BF16_PIXEL_TABLE[k] = bf16((k/255 - 0.5) / 0.5) as float32, for uint8 k.
BF16_PIXEL_TABLE: np.ndarray = _pixel_table()


def normalize_tiles_reference(arr_uint8: np.ndarray) -> np.ndarray:
    """uint8 [T, S, S, 3] -> float32 [T, 3, S, S] in [-1, 1], bf16-rounded exactly like the reference."""
    arr = np.asarray(arr_uint8)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T, S, S, 3], got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(BF16_PIXEL_TABLE[arr].transpose(0, 3, 1, 2))
