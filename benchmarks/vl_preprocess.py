"""VL preprocessing throughput: 1920x1080 JPEG pages decoded, tiled and tokenized as a CPU replica does.

    python benchmarks/vl_preprocess.py --tokenizer ../shared/tokenizers/llama3-vl [--images 40]

Runs ``VLReranker.encode`` (weights not loaded, exactly what a ``Preprocess`` replica runs) on synthetic
page images sent as data URLs, one thread, and prints images/s, the tiles per page, and the bytes per
document that cross the handle to the scorer (the pickled ``EncodedPairs``: uint8 tiles and int32 ids).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))


def page(seed: int, size=(1920, 1080)) -> str:
    """A slide-like page: background, coloured blocks, 'text' lines, a little noise; JPEG data URL."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(x) for x in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, size[0] - 200)), int(rng.integers(0, size[1] - 100))
        d.rectangle([x0, y0, x0 + int(rng.integers(80, 600)), y0 + int(rng.integers(40, 300))],
                    fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
    for y in range(60, size[1] - 40, 28):
        d.line([(80, y), (80 + int(rng.integers(300, 1700)), y)], fill=(30, 30, 30), width=6)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="directory with the VL tokenizer.json")
    ap.add_argument("--images", type=int, default=40)
    args = ap.parse_args()
    from rerank_core import load_reranker
    from rerank_core.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny("vl", tmp + "/vl", tokenizer=args.tokenizer)
        r = load_reranker(ckpt, device="cpu", load_weights=False)
        pages = [page(i) for i in range(args.images)]
        r.encode("warm up", [{"image": pages[0]}])
        t0 = time.perf_counter()
        sizes, tiles = [], []
        for p in pages:
            enc = r.encode("which slide shows the revenue chart?", [{"text": "Q3 revenue", "image": p}])
            sizes.append(len(pickle.dumps(enc, protocol=5)))
            tiles.append(int(enc.num_tiles.sum()))
        secs = time.perf_counter() - t0
    print(json.dumps({
        "images": len(pages),
        "image_size": "1920x1080 JPEG",
        "jpeg_bytes_mean": int(np.mean([len(p) * 3 // 4 for p in pages])),
        "tiles_per_image": sorted(set(tiles)),
        "images_per_s_one_thread": round(len(pages) / secs, 2),
        "bytes_crossing_handle_per_document": int(np.mean(sizes)),
        "of_which_uint8_tiles": tiles[0] * 512 * 512 * 3,
        "float32_tiles_would_be": tiles[0] * 512 * 512 * 3 * 4,
    }, indent=2))


if __name__ == "__main__":
    main()
