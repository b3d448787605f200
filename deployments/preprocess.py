"""CPU preprocessing replicas: prompts, tokens, truncation and image tiles for one model."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from rerank_core import InvalidInput, load_reranker
from rerank_core.tokenization import EncodedPairs

from .config import LimitsArgs, ModelArgs
from .messages import PrepareRequest
from .metrics import PreprocessMetrics

log = logging.getLogger("ray.serve")


@serve.deployment
class Preprocess:
    """Turns a chunk of documents into ``EncodedPairs`` (int32 ids, uint8 tiles) for the scorer.

    Loads the checkpoint's config and tokenizer only, never the weights.
    """

    def __init__(self, model: dict, limits: dict):
        self.model_args = ModelArgs.model_validate(model)
        self.limits = LimitsArgs.model_validate(limits)
        m = self.model_args
        self.encoder = load_reranker(
            m.source,
            device="cpu",
            revision=m.revision,
            max_length=m.max_tokens,
            query_budget=m.query_budget,
            load_weights=False,
        )
        if self.encoder.kind == "vl":
            from rerank_core.imaging import ImageLimits

            self.encoder.image_limits = ImageLimits(
                max_bytes=self.limits.max_image_bytes, max_pixels=self.limits.max_image_pixels
            )
        self.metrics = PreprocessMetrics(m.id)
        log.info("preprocess for %s ready (%s model, max %d tokens)", m.id, self.encoder.kind, self.encoder.max_length)

    def _prepare(self, req: PrepareRequest) -> EncodedPairs:
        m, enc = self.model_args, self.encoder
        q_tokens = enc.tokenizer.count_tokens(req.query)
        if q_tokens > m.query_max_tokens:
            raise InvalidInput(
                f"query is {q_tokens} tokens, over the limit of {m.query_max_tokens}", param="query"
            )
        if req.max_length is not None and req.max_length > enc.max_length:
            raise InvalidInput(
                f"truncate_prompt_tokens {req.max_length} is over the model's maximum of {enc.max_length}",
                param="truncate_prompt_tokens",
            )
        docs: list = []
        for text, image in req.documents:
            docs.append(text if image is None else {"text": text or "", "image": image})
        kwargs = {}
        if enc.kind == "vl" and m.max_tiles:
            kwargs["max_tiles"] = m.max_tiles
        return enc.encode(
            req.query,
            docs,
            truncate=req.truncate,
            max_length=req.max_length,
            max_tokens_per_doc=req.max_tokens_per_doc,
            max_chunks=req.max_chunks,
            **kwargs,
        )

    async def prepare(self, req: PrepareRequest) -> EncodedPairs:
        # tokenizers and PIL release the GIL: a thread keeps the replica's event loop responsive
        t0 = time.monotonic()
        enc = await asyncio.to_thread(self._prepare, req)
        self.metrics.record((time.monotonic() - t0) * 1000, sum(1 for _, image in req.documents if image))
        return enc

    def count_tokens(self, text: str) -> int:
        return self.encoder.tokenizer.count_tokens(text)

    def info(self) -> dict:
        return {"kind": self.encoder.kind, "max_length": self.encoder.max_length}
