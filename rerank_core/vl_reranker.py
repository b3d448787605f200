"""The VL reranker: text, image and image+text documents against a text query.

Prompt layout (models.md §2.6), all ids, BOS first:

* image or image+text document: ``BOS <img> <IMG_CONTEXT> x (256 * tiles) </img>`` followed by the ids of
  `` question:{query} \\n \\n passage:{text}`` (``text`` may be empty);
* text-only document: ``BOS question:{query} \\n \\n passage:{text}``, as for the text model.

The image block is an untruncatable prefix: truncation cuts the passage text first, and an image block
that does not fit on its own is an ``InputTooLong`` error (the reference would silently misalign image
features instead). User text is always plain text: a literal ``<img>``, ``<IMG_CONTEXT>`` or ``<image>``
typed in a query or passage never becomes a special token (nor is ``<image>`` deleted, as the reference
does for text-only prompts).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .batching import PackPlan, pack, pad_ids
from .errors import CheckpointError, InvalidInput
from .imaging import DEFAULT_LIMITS, ImageLimits, load_image_any, tile_image, tiles_to_array
from .reranker import Reranker
from .tokenization import EncodedPairs

DOC_KEYS = frozenset({"text", "image"})
IMAGE_TYPES = (bytes, bytearray, memoryview, str, os.PathLike, Image.Image)
MAX_TILES_LIMIT = 40  # 40 tiles = 10242 image tokens: already over the model's 10240-token limit


class VLReranker(Reranker):
    """A loaded ``llama-nemotron-rerank-vl-1b-v2``: ``score``/``rerank`` accept image documents.

    Extra settings: ``image_limits`` (decoding bounds, ``imaging.ImageLimits``) and ``max_batch_tiles``
    (image tiles per forward micro-batch, on top of the base class's token budget).
    """

    kind = "vl"

    def __init__(
        self,
        *args: Any,
        image_limits: ImageLimits | None = None,
        max_batch_tiles: int = 64,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.image_limits = image_limits or DEFAULT_LIMITS
        self.max_batch_tiles = int(max_batch_tiles)
        tok = self.tokenizer
        if tok.img_start_id is None or tok.img_end_id is None or tok.img_context_id is None:
            raise CheckpointError("the VL tokenizer lacks <img>, </img> or <IMG_CONTEXT>")
        cfg = self.info.config
        if tok.img_context_id != cfg.img_context_token_id:
            raise CheckpointError(
                f"tokenizer <IMG_CONTEXT> id {tok.img_context_id} differs from the config's "
                f"img_context_token_id {cfg.img_context_token_id}"
            )
        self.tokens_per_tile = int(cfg.num_image_token)
        self.tile_size = int(cfg.force_image_size)

    # -- prepare -------------------------------------------------------------------------------------
    def _split_documents(self, documents: Sequence[Any]) -> tuple[list[str], list[Any]]:
        """Each document -> (text, raw image or None), validating the shapes the API accepts."""
        texts: list[str] = []
        images: list[Any] = []
        for i, d in enumerate(documents):
            if isinstance(d, str):
                texts.append(d)
                images.append(None)
                continue
            if not isinstance(d, dict):
                raise InvalidInput(
                    f"document {i}: expected a string or an object with 'text' and/or 'image', got {type(d).__name__}",
                    param="documents",
                )
            extra = set(d) - DOC_KEYS
            if extra:
                raise InvalidInput(
                    f"document {i}: unknown field(s) {sorted(map(str, extra))}; use 'text' and 'image'",
                    param="documents",
                )
            text, image = d.get("text"), d.get("image")
            if text is not None and not isinstance(text, str):
                raise InvalidInput(f"document {i}: 'text' must be a string", param="documents")
            if isinstance(image, (list, tuple)):
                raise InvalidInput(
                    f"document {i}: one image per document is supported, got a list of {len(image)}",
                    param="documents",
                )
            if image is not None and not isinstance(image, IMAGE_TYPES):
                raise InvalidInput(
                    f"document {i}: 'image' must be bytes, a PIL image, a file path, a data URL or base64, "
                    f"not {type(image).__name__}",
                    param="documents",
                )
            if image is None and text is None:
                raise InvalidInput(f"document {i}: needs 'text' or 'image'", param="documents")
            texts.append(text or "")
            images.append(image)
        return texts, images

    def _tiles(self, image: Any, index: int, max_tiles: int) -> np.ndarray:
        """Decode (bounded) and tile one image: uint8 [T, S, S, 3]."""
        img = load_image_any(image, self.image_limits, param=f"documents[{index}].image")
        cfg = self.info.config
        tiles = tile_image(img, max_tiles, 1, self.tile_size, use_thumbnail=cfg.use_thumbnail)
        return tiles_to_array(tiles)

    def image_block_ids(self, num_tiles: int) -> list[int]:
        """``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile * num_tiles) + ``</img>``."""
        t = self.tokenizer
        return [t.img_start_id, *([t.img_context_id] * (self.tokens_per_tile * num_tiles)), t.img_end_id]

    def encode(
        self,
        query: str,
        documents: Sequence[Any],
        truncate: str = "END",
        max_length: int | None = None,
        max_tokens_per_doc: int | None = None,
        max_chunks: int | None = None,
        max_tiles: int | None = None,
    ) -> EncodedPairs:
        if not isinstance(query, str):
            raise InvalidInput(
                "query must be a string: this model ranks documents (text and/or image) against a text query; "
                "image queries are not supported",
                param="query",
            )
        limit = self.max_length if max_length is None else int(max_length)
        if limit < 2:
            raise InvalidInput("max_length must be at least 2", param="max_length")
        if max_tiles is None:
            max_tiles = int(self.info.config.max_input_tiles)
        if isinstance(max_tiles, bool) or not isinstance(max_tiles, (int, np.integer)):
            raise InvalidInput("max_tiles must be an integer", param="max_tiles")
        if not 1 <= int(max_tiles) <= MAX_TILES_LIMIT:
            raise InvalidInput(f"max_tiles must be between 1 and {MAX_TILES_LIMIT}", param="max_tiles")
        texts, images = self._split_documents(documents)
        doc_tiles = [None if im is None else self._tiles(im, i, int(max_tiles)) for i, im in enumerate(images)]
        prefixes = [[] if t is None else self.image_block_ids(len(t)) for t in doc_tiles]
        enc = self.tokenizer.encode_text_pairs(
            query,
            texts,
            truncate=truncate,
            max_length=limit,
            max_tokens_per_doc=max_tokens_per_doc,
            max_chunks=max_chunks,
            prefix_ids=prefixes,
        )
        if any(t is not None for t in doc_tiles):
            per_pair = [doc_tiles[int(d)] for d in enc.doc_index]  # a chunked document repeats its tiles
            enc.num_tiles = np.array([0 if t is None else len(t) for t in per_pair], dtype=np.int32)
            enc.tiles = np.concatenate([t for t in per_pair if t is not None], axis=0)
        return enc

    # -- forward -------------------------------------------------------------------------------------
    def plan_rows(self, rows: Sequence[np.ndarray], tiles: Sequence[np.ndarray | None] | None = None) -> PackPlan:
        """Micro-batches under both the token budget and the tile budget (``max_batch_tiles``).

        Also checks that every row has exactly 256 ``<IMG_CONTEXT>`` slots per tile it comes with.
        """
        tiles = list(tiles) if tiles is not None else [None] * len(rows)
        if len(tiles) != len(rows):
            raise ValueError("one tiles entry (or None) per row is needed")
        counts = []
        for i, (row, t) in enumerate(zip(rows, tiles)):
            n = 0 if t is None else len(t)
            slots = int(np.count_nonzero(np.asarray(row) == self.tokenizer.img_context_id))
            if slots != n * self.tokens_per_tile:
                raise InvalidInput(
                    f"row {i} has {slots} <IMG_CONTEXT> tokens but {n} tile(s) ({self.tokens_per_tile} tokens each)",
                    param="documents",
                )
            counts.append(n)
        return pack([len(r) for r in rows], self.max_batch_tokens, tiles=counts, max_tiles=self.max_batch_tiles)

    @torch.inference_mode()
    def _forward_batch(self, rows: Sequence[np.ndarray], tiles: Sequence[np.ndarray | None]) -> np.ndarray:
        ids, mask = pad_ids(rows, self.pad_id)
        present = [t for t in tiles if t is not None and len(t)]
        tiles_t = self._to_device(np.ascontiguousarray(np.concatenate(present, axis=0))) if present else None
        logits = self.model(
            self._to_device(ids), self._to_device(mask), tiles=tiles_t, apply_temperature=self.apply_temperature
        )
        return logits.float().cpu().numpy()
