"""Turning a chunk of a request into ``EncodedPairs``: shared by the preprocess replicas and the ingress.

Kept apart from the deployment modules so both import it by name (a Serve deployment class is shipped to its
replicas by value; helpers beside it must resolve there too)."""

from __future__ import annotations

from rerank_core import InvalidInput, load_reranker
from rerank_core.tokenization import EncodedPairs

from .config import LimitsArgs, ModelArgs
from .messages import PrepareRequest


class ChunkPreparer:
    """A model's prompt builder, tokenizer and image tiler (config and tokenizer only, never the weights)."""

    def __init__(self, model: ModelArgs, limits: LimitsArgs):
        self.model_args = model
        self.encoder = load_reranker(
            model.source,
            device="cpu",
            revision=model.revision,
            max_length=model.max_tokens,
            query_budget=model.query_budget,
            load_weights=False,
        )
        if self.encoder.kind == "vl":
            from rerank_core.imaging import ImageLimits

            self.encoder.image_limits = ImageLimits(
                max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
            )

    def prepare(self, req: PrepareRequest) -> EncodedPairs:
        """Token ids (and image tiles) of one chunk; ``InvalidInput`` for a query or length over the limits."""
        m, enc = self.model_args, self.encoder
        q_tokens = enc.tokenizer.count_tokens(req.query)
        if q_tokens > m.query_max_tokens:
            raise InvalidInput(f"query is {q_tokens} tokens, over the limit of {m.query_max_tokens}", param="query")
        if req.max_length is not None and req.max_length > enc.max_length:
            raise InvalidInput(
                f"truncate_prompt_tokens {req.max_length} is over the model's maximum of {enc.max_length}",
                param="truncate_prompt_tokens",
            )
        docs: list = [text if image is None else {"text": text or "", "image": image} for text, image in req.documents]
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
