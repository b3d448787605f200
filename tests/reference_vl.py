"""An independent reference of NVIDIA's VL reranker for parity tests.

Built from transformers' own layers: ``SiglipVisionModel`` (loaded with the checkpoint's vision tensors,
its attention-pooling head included, whose output is then ignored), ``LlamaDecoderLayer`` /
``LlamaRMSNorm`` / ``LlamaRotaryEmbedding`` with eager attention and a 4D key-padding mask, and a plain
``nn.Sequential`` projector with exact GELU. Preprocessing is written here from models.md §2.5-2.6
without importing ``rerank_core``: grid choice, PIL resize in the image's original mode, row-major crops
plus a thumbnail, per-tile RGB conversion, ToTensor/Normalize in torch and bf16 rounding; the prompt is
one string holding ``<img><IMG_CONTEXT>...</img>`` tokenized by the transformers tokenizer with left
padding and right truncation; positions run 0..L-1 over the padded length. The pixel shuffle is the
view/permute sequence NVIDIA's code uses (as described in the spec), not the closed formula.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlamaConfig, SiglipVisionConfig, SiglipVisionModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from tests.reference import hf_tokenizer

TILE = 512
PER_TILE = 256
PROMPT = "question:{query} \n \n passage:{passage}"


# --------------------------------------------------------------------------------------- preprocessing
def grid_candidates(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """(cols, rows) pairs gathered in a set, in the n -> cols -> rows insertion sequence, then sorted
    stably by tile count (the set's iteration order decides ties, as in the reference processor)."""
    pairs = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    return sorted(pairs, key=lambda p: p[0] * p[1])


def best_grid(width: int, height: int, max_tiles: int) -> tuple[int, int]:
    aspect = width / height
    chosen, chosen_score = (1, 1), float("-inf")
    for cols, rows in grid_candidates(max_tiles):
        t = cols / rows
        area = (cols * rows * TILE * TILE) / (width * height)
        s = min(area, 0.6) * min(t / aspect, aspect / t)
        if s > chosen_score:
            chosen, chosen_score = (cols, rows), s
    return chosen


def split_tiles(image: Image.Image, max_tiles: int = 6, use_thumbnail: bool = True) -> list[Image.Image]:
    cols, rows = best_grid(image.width, image.height, max_tiles)
    big = image.resize((TILE * cols, TILE * rows))
    out = []
    for k in range(cols * rows):
        x, y = (k % cols) * TILE, (k // cols) * TILE
        out.append(big.crop((x, y, x + TILE, y + TILE)))
    if use_thumbnail and len(out) > 1:
        out.append(image.resize((TILE, TILE)))
    return out


def tile_tensor(tile: Image.Image) -> torch.Tensor:
    """RGB -> ToTensor (/255) -> Normalize(0.5, 0.5) -> [3, S, S] float32."""
    rgb = tile if tile.mode == "RGB" else tile.convert("RGB")
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (x - 0.5) / 0.5


def image_pixel_values(image: Image.Image, max_tiles: int = 6) -> torch.Tensor:
    """[T, 3, S, S] float32 holding bf16-rounded values, as the processor hands them to the model."""
    tiles = torch.stack([tile_tensor(t) for t in split_tiles(image, max_tiles)])
    return tiles.to(torch.bfloat16).float()


# ------------------------------------------------------------------------------------------------ model
def nvidia_pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """[T, W, H, C] -> [T, W*scale, H*scale, C/scale^2] by the reference's view/permute steps
    (the "v2" variant, whose second permute swaps the spatial axes back)."""
    t, w, h, c = x.shape
    x = x.view(t, w, int(h * scale), int(c / scale))  # fold pairs of neighbours along H into channels
    x = x.permute(0, 2, 1, 3).contiguous()  # swap the spatial axes
    x = x.view(t, int(h * scale), int(w * scale), int(c / (scale * scale)))  # fold along (former) W
    return x.permute(0, 2, 1, 3).contiguous()


class ReferenceVLReranker(torch.nn.Module):
    def __init__(self, path: str, vision_attn: str = "sdpa"):
        """``vision_attn``: transformers' attention backend for SigLIP ("sdpa" keeps the CPU tests quick;
        "eager" agrees within ~1e-6). The language model always runs eager with a 4D key-padding mask."""
        super().__init__()
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        self.raw = raw
        llm = {k: v for k, v in raw["llm_config"].items() if k not in ("architectures", "auto_map", "model_type")}
        self.llm_config = LlamaConfig(**llm)
        self.llm_config._attn_implementation = "eager"
        vis = {k: v for k, v in raw["vision_config"].items() if k not in ("model_type", "architectures")}
        self.vision_config = SiglipVisionConfig(**vis)
        self.vision_config._attn_implementation = vision_attn
        self.scale = float(raw["downsample_ratio"])
        self.img_context_id = int(raw["img_context_token_id"])

        c, lc = self.vision_config, self.llm_config
        self.vision_model = SiglipVisionModel(c)
        width = int(c.hidden_size / self.scale**2)
        self.mlp1 = torch.nn.Sequential(
            torch.nn.LayerNorm(width),
            torch.nn.Linear(width, lc.hidden_size),
            torch.nn.GELU(),
            torch.nn.Linear(lc.hidden_size, lc.hidden_size),
        )
        self.embed_tokens = torch.nn.Embedding(lc.vocab_size, lc.hidden_size)
        self.layers = torch.nn.ModuleList(LlamaDecoderLayer(lc, i) for i in range(lc.num_hidden_layers))
        self.norm = LlamaRMSNorm(lc.hidden_size, eps=lc.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(lc)
        self.score = torch.nn.Linear(lc.hidden_size, 1, bias=False)

        sd = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        vision = {k.removeprefix("model.vision_model.vision_model."): v for k, v in sd.items() if "vision_model" in k}
        self.vision_model.load_state_dict(vision, strict=True)  # the head too: it must be there
        rest = {
            k.removeprefix("model.").removeprefix("language_model."): v
            for k, v in sd.items()
            if "vision_model" not in k
        }
        missing, unexpected = self.load_state_dict(rest, strict=False)
        assert not unexpected, unexpected
        assert all(k.startswith("vision_model.") for k in missing), missing
        self.tokenizer = hf_tokenizer(path)
        self.eval()

    # ----------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def image_vectors(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, 3, S, S] -> [T * 256, H]."""
        out = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [T, N, C]
        t, n, c = out.shape
        side = int(n**0.5)
        x = nvidia_pixel_shuffle(out.reshape(t, side, side, c), self.scale)
        x = x.reshape(t, -1, x.shape[-1])
        return self.mlp1(x).reshape(-1, self.llm_config.hidden_size)

    @torch.no_grad()
    def forward_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        b, length = input_ids.shape
        h = self.embed_tokens(input_ids)
        if pixel_values is not None:
            vec = self.image_vectors(pixel_values)
            where = input_ids == self.img_context_id
            assert int(where.sum()) == vec.shape[0], "image tokens and vision vectors disagree"
            h = h.clone()
            h[where] = vec
        pos = torch.arange(length)[None].expand(b, -1)
        cos_sin = self.rotary(h, pos)
        mask = torch.zeros(b, 1, length, length)
        mask = mask.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            h = h[0] if isinstance(h, tuple) else h
        h = self.norm(h)
        m = attention_mask[..., None].float()
        pooled = (h * m).sum(1) / m.sum(1)
        return self.score(pooled)[:, 0]

    def prompts(self, query: str, docs: list, max_tiles: int = 6) -> tuple[list[str], torch.Tensor | None]:
        """docs: strings or {"text", "image": PIL image or None}. Returns prompt strings and pixel values."""
        texts, pixels = [], []
        for d in docs:
            text, image = (d, None) if isinstance(d, str) else (d.get("text") or "", d.get("image"))
            if image is None:
                # the reference drops the first literal "<image>" of a text-only prompt
                texts.append(PROMPT.format(query=query, passage=text).replace("<image>", "", 1))
                continue
            pv = image_pixel_values(image, max_tiles)
            pixels.append(pv)
            block = "<img>" + "<IMG_CONTEXT>" * (PER_TILE * pv.shape[0]) + "</img>"
            texts.append(block + " " + PROMPT.format(query=query, passage=text))
        return texts, (torch.cat(pixels) if pixels else None)

    def score_docs(self, query: str, docs: list, max_length: int = 10240, max_tiles: int = 6) -> list[float]:
        texts, pixel_values = self.prompts(query, docs, max_tiles)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return self.forward_ids(enc["input_ids"], enc["attention_mask"], pixel_values).tolist()
