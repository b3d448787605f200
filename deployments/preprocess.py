"""CPU preprocessing replicas: prompts, tokens, truncation and image tiles for one model."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from rerank_core.tokenization import EncodedPairs

from .config import LimitsArgs, ModelArgs
from .messages import PrepareRequest
from .metrics import PreprocessMetrics
from .prepare import ChunkPreparer

log = logging.getLogger("ray.serve")


@serve.deployment
class Preprocess:
    """Turns a chunk of documents into ``EncodedPairs`` (int32 ids, uint8 tiles) for the scorer.

    Loads the checkpoint's config and tokenizer only, never the weights.
    """

    def __init__(self, model: dict, limits: dict):
        self.model_args = ModelArgs.model_validate(model)
        self.preparer = ChunkPreparer(self.model_args, LimitsArgs.model_validate(limits))
        self.encoder = self.preparer.encoder
        self.metrics = PreprocessMetrics(self.model_args.id)
        log.info("preprocess for %s ready (%s model, max %d tokens)", self.model_args.id, self.encoder.kind,
                 self.encoder.max_length)

    async def prepare(self, req: PrepareRequest) -> EncodedPairs:
        # tokenizers and PIL release the GIL: a thread keeps the replica's event loop responsive
        t0 = time.monotonic()
        enc = await asyncio.to_thread(self.preparer.prepare, req)
        self.metrics.record((time.monotonic() - t0) * 1000, sum(1 for _, image in req.documents if image))
        return enc

    def count_tokens(self, text: str) -> int:
        return self.encoder.tokenizer.count_tokens(text)

    def info(self) -> dict:
        return {"kind": self.encoder.kind, "max_length": self.encoder.max_length}
